"""Where a stage runs, kept apart from what it computes.

Every stage's command in dvc.yaml is `python -m llmpipe.launch <stage>`. The executor, one
process, torchrun, accelerate or a Slurm job, comes from this machine's setting
(`.llmpipe/executor.yaml`, git-ignored, or the LLMPIPE_EXECUTOR variable: executors.py), never
from params.yaml, so moving a stage from a laptop to a box of GPUs or a cluster changes no
stage's hash: DVC reruns nothing, and the run-cache of one machine serves the others.

That holds because a stage's result does not depend on where it ran: the stages that train on
several processes keep their global batch whatever the count (pretrain, finetune, lora and the
reward model agree across counts to 1e-4 relative: tests/test_launchers.py), and
GRPO, whose completions depend on the count, keeps the count in params (`<stage>.processes`).

Nothing here is a dependency of a stage (tests/test_dvc_yaml.py): this package imports only the
standard library, ruamel.yaml and llmpipe's errors and layout, and starts the stage's script
(`python -m stages.<stage>`) unchanged.

    python -m llmpipe.launch finetune                      # what dvc.yaml runs
    python -m llmpipe.launch.queue --devices 0,1,2,3       # queued experiments, one GPU each
    python -m llmpipe.launch.skypilot gpu -o sky.yaml      # a SkyPilot task for a preset
"""
