"""The shared core every stage may use and that uses no stage.

errors (the user-error base class), config (the one loader for every schema), rundir (the layout
of a training run), manifest (the shard contract between curation and training), distributed
(process group, rank agreement, the torchrun command), torchrun (the launcher that command runs:
torchrun ending a rank's user error with its one line and status 2).
"""
