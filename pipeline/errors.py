"""UserError: the base of every error whose message is written for the user (it names the problem and the fix).

`rlhf` prints such an error as one line and exits 2; any other exception is a bug and keeps its traceback.
The module imports nothing, so the command line can tell the two apart without importing torch.
"""


class UserError(Exception):
    """An input the user can fix: a config, a data file, a model source, an artifact reference, a command line."""
