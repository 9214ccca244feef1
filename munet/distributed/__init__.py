"""Where a generation's children are trained: in this process or on a Ray cluster (the executor seam)."""
