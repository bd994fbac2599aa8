"""The ``vafunc`` command line (:mod:`vafunc.cli.app`) and its main job, ``vafunc demo``
(:mod:`vafunc.cli.demo`). ``python -m vafunc.cli`` runs the command."""


def main(argv=None) -> int:
    """The ``vafunc`` command (:func:`vafunc.cli.app.main`)."""
    from vafunc.cli.app import main as run

    return run(argv)
