"""What the command-line tools' tests share."""

import pytest


def assert_usage_error(capsys, main, prog: str, argv, *fragments) -> None:
    """`main(ARGV)` stops before any work: exit 2 and one line, `PROG: error: ...` (not argparse's usage
    block), holding every fragment."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"{prog}: error:"), err
    for f in fragments:
        assert f in err, (f, err)
