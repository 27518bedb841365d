"""Budgets, and the searches that turn one into a plan of per-layer edits.

    from compressor.search.apply import apply_plan
    from compressor.search.budgets import Budget
    from compressor.search.candidates import layer_candidates
    from compressor.search.fixed_loss import search_fixed_loss
    from compressor.search.kernels import KernelCache

    kernels = KernelCache()  # effective kernels, built once and shared by both steps
    candidates, skipped = layer_candidates(model, {"tucker"}, kernels=kernels)
    result = search_fixed_loss(
        model, candidates, data, Budget.accuracy_drop(0.02), cache_dir,
        skipped=skipped, kernels=kernels,
    )
    compressed = apply_plan(model, result.plan)

- `budgets`: what the user asks for (no TensorFlow import: safe for option parsing).
- `candidates`: per layer, the edits the techniques offer, with costs and errors.
- `evaluate`: whole-model accuracy of candidate edits through effective kernels.
- `fixed_params`: data-free, a global allocation of a params/FLOPs budget.
- `fixed_loss`: cached per-layer sensitivity, then one accuracy level for all layers.
- `apply`: a plan applied to its model; `result`: what a search returns.
"""
