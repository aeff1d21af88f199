"""Whether MetaGPT's assumptions hold for given inputs: task-vector geometry, shown and explained.

engine/gram.py (tensor math: τi·τj beside the norms, computed by the engine's kernels) →
geometry.py (values: per-group Gram matrices,
shares, cosines, λ at each granularity, the overlap rule) → report.py (`inspect`'s JSON and
table), plots.py (figures), card.py (the card's sections). Data flows one way; nothing here
reads or writes model files.
"""
