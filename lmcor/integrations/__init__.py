"""lmcor inside other engines. Each module is an optional extra, imported only when used:

- `ray` (`pip install 'lmcor[ray]'`): Ray Serve replicas of `lmcor serve`, and Ray Data jobs that
  correct large JSONL files with one loaded bundle per worker. See docs/ray.md.
"""
