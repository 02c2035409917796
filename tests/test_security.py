"""Hygiene: checkpoints never unpickle code, configs never construct Python objects."""
import os

import pytest
import torch
import yaml

from psa_dist.config import load_config
from psa_dist.engine import load_checkpoint, save_checkpoint


class Payload:
    """An object whose unpickling would run code (os.system)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok = tmp_path / "ok.pth"
    save_checkpoint(ok, {"model": {"w": torch.ones(2)}, "step": 3})
    assert load_checkpoint(ok)["step"] == 3
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}, "evil": Payload()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_config_with_python_tags_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(yaml.YAMLError):
        load_config(p)
    with pytest.raises(yaml.YAMLError):
        load_config(None, ["name=!!python/object/apply:os.system ['touch pwned']"])
    assert not (tmp_path / "pwned").exists()
