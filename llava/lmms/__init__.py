"""lmms-eval plugin: any lmms-eval task on our checkpoints, with any registered pruning method (docs/lmms_eval.md).

- ``llava.lmms.manifest``: what the ``lmms_eval.models`` entry point hands lmms-eval (imports nothing heavy);
- ``llava.lmms.options``: ``--model_args`` checked against the loader's options and the pruning flags;
- ``llava.lmms.scoring``: continuation log-likelihoods through ``generate`` (both pruning stages apply);
- ``llava.lmms.model``: the ``lmms`` class itself (imported only by lmms-eval; needs the ``[lmms]`` extra).

Only ``model`` and ``manifest`` import lmms-eval; the rest works without it.
"""
