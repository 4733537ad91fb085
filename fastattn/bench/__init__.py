"""The benchmark harness behind ``python -m fastattn.bench`` (console script ``fastattn-bench``).

Modules, in the order data flows through them:

* :mod:`.sweep`: the cases (default sweeps per device) and the FLOP convention;
* :mod:`.providers`: fastattn, SDPA per backend and by its own choice, FlexAttention, the reference;
* :mod:`.gate`: every provider's answer against the float64 reference before it is timed;
* :mod:`.timing`: CUDA events or torch.utils.benchmark, peak memory, the machine's ceilings;
* :mod:`.runner`: one row per case, mode and provider, failures and OOM included;
* :mod:`.report`: markdown, CSV, JSON and PNG; :mod:`.progress`: the progress bar;
* :mod:`.readme`: the README's performance section, rendered from a results.json.

Importing the package does not import triton (its kernel flavour is fixed at first import).
"""
