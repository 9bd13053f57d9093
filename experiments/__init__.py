"""The experiments: one config file each (`get_config(arg=None)`), loaded by `launch.py --config=`.

A package so that experiment files import each other and `experiments.common` without touching
`sys.path` (the rule is in `experiments/common.py`).
"""
