"""``rlhf-fast isa``: the cost of every row kernel on a GPU's SM, read from its SASS without a GPU.

Modules, in pipeline order: ``capture`` (record the launchers' real specialisations under a
stand-in driver), ``launch_plan`` (the op calls that launch them), ``sass`` (compile, read the
SASS loops), ``row_kernels`` (what each kernel does with a row), ``model`` (pipe / HBM / L2
throughput model, estimates), ``analysis`` (one report per launch), ``budget`` (the limits a
test holds every kernel to), ``report`` (table, JSON, command line).
"""
