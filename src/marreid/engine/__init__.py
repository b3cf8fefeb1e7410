"""Training and evaluation machinery, one job per module (import from the module itself):

- ``checkpoint``: atomic ``save_checkpoint``, safe ``load_checkpoint``;
- ``seeding``: ``seed_everything`` and RNG state capture / restore;
- ``logging``: ``RunLogger`` (progress bars, log.jsonl, TensorBoard);
- ``extract``: ``extract_features``, ``evaluate_model``, ``load_target``, ``resolve_device``;
- ``stepped``: ``SteppedTrainer``, the step loop both trainings share;
- ``pretrain``: ``run_pretrain`` (L_AL on the auxiliary set) and ``load_auxiliary``;
- ``train``: ``MARTrainer`` and ``run_train``;
- ``variants``: the MAR variants a pipeline trains;
- ``stages``: ``plan_stage``, skip / resume / restart for runs in folders;
- ``pipeline``: ``run_pipeline``, pretrain -> direct transfer -> variants.

Nothing is imported here, so importing one light module (e.g. ``checkpoint``)
does not pull in torchvision models and the losses.
"""
