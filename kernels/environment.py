"""The process's environment variables, set for a block of code only."""
import contextlib
import os


@contextlib.contextmanager
def environment_while(variables: dict):
    """The process's environment with `variables` set for the block, as it was after it."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
