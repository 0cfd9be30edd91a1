"""Every stage's --help shows its example commands (the module docstring) and the default of every flag that has
one."""
import argparse

import pytest

from conftest import load_script

STAGES = [("make_demo_data", "00_make_demo_data.py", "main"), ("mine_regions", "01_mine_regions.py", "parse_args"),
          ("extract_ocr", "02_extract_ocr.py", "parse_args"), ("cluster", "03_cluster.py", "parse_args"),
          ("train", "04_train.py", "parse_args"), ("eval", "05_eval.py", "parse_args"),
          ("export_hf", "06_export_hf.py", "parse_args")]


@pytest.mark.parametrize("name,file,entry", STAGES)
def test_help_shows_commands_and_defaults(name, file, entry, monkeypatch, capsys):
    module = load_script(name, file)
    parsers = []
    real = argparse.ArgumentParser.format_help

    def grab(self):
        parsers.append(self)
        return real(self)
    monkeypatch.setattr(argparse.ArgumentParser, "format_help", grab)
    with pytest.raises(SystemExit) as e:
        getattr(module, entry)(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python " + file in text or "torchrun" in text, text[:500]          # the example commands
    parser = parsers[-1]
    shown = 0
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        block = parser._get_formatter()._format_action(action)
        assert str(action.default) in " ".join(block.split()), (file, action.option_strings, block)
        shown += 1
    assert shown >= 1
