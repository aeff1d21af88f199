"""The merge engine: plan (a value) → schedule → executor (reads, kernels, shard writer), work folder."""
