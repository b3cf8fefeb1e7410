"""Training and evaluation machinery, one job per module (import from the module itself):

- ``checkpoint``: atomic ``save_checkpoint``, safe ``load_checkpoint``;
- ``seeding``: ``seed_everything`` and RNG state capture / restore;
- ``logging``: ``RunLogger`` (progress bars, log.jsonl, TensorBoard);
- ``extract``: ``extract_features``, ``evaluate_model``, ``load_target``, ``resolve_device``;
- ``pretrain``: ``run_pretrain`` (L_AL on the auxiliary set) and the shared step loop;
- ``train``: ``MARTrainer`` and ``run_train``.

Nothing is imported here, so importing one light module (e.g. ``checkpoint``)
does not pull in torchvision models and the losses.
"""
