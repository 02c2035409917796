"""Hygiene: checkpoints never unpickle code, configs never construct Python objects."""
import os
from pathlib import Path

import pytest
import torch
import yaml

from psa_dist.config import load_config
from psa_dist.nets.checkpoint import load_checkpoint, save_checkpoint


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


def test_pretrained_weights_with_code_are_refused(tmp_path, monkeypatch):
    """model.pretrained goes through torch.load(weights_only=True) as well."""
    from psa_dist.nets.backbones import build_backbone
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.ones(1), "evil": Payload()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_backbone("small", str(bad))
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- Ray dashboard
REPO = Path(__file__).resolve().parents[2]


def test_ray_heads_keep_the_dashboard_off_and_local_by_default():
    from psa_dist.cluster.ray_job import ray_start_command
    rc = load_config(None).ray
    assert (rc.dashboard, rc.dashboard_host) == (False, "127.0.0.1")
    head = ray_start_command(rc, True, "10.0.0.1", 6379, "8", "0", "/tmp/r")
    assert "--include-dashboard=false" in head and "--dashboard-host=127.0.0.1" in head
    worker = ray_start_command(rc, False, "10.0.0.1", 6379, "8", "0", "/tmp/r")
    assert not [a for a in worker if "dashboard" in a]
    rc = load_config(None, ["ray.dashboard=true", "ray.dashboard_host=0.0.0.0"]).ray
    head = ray_start_command(rc, True, "10.0.0.1", 6379, "8", "0", "/tmp/r")
    assert "--include-dashboard=true" in head and "--dashboard-host=0.0.0.0" in head
    # the batch script's head: off unless PSA_RAY_DASHBOARD, on 127.0.0.1 unless PSA_RAY_DASHBOARD_HOST
    script = (REPO / "launch" / "ray_slurm.sbatch").read_text().replace("\\\n", " ")
    heads = [line for line in script.splitlines() if "start --head" in line]
    assert len(heads) == 1
    assert '--include-dashboard="${PSA_RAY_DASHBOARD:-false}"' in heads[0]
    assert '--dashboard-host="${PSA_RAY_DASHBOARD_HOST:-127.0.0.1}"' in heads[0]


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_dashboard_listens_on_localhost_only():
    import ray
    from psa_dist.cluster.shard_pool import ensure_ray
    ensure_ray(load_config(None, ["ray.dashboard=true"]).ray, 1)
    try:
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert listening_addresses(int(port)) == {"127.0.0.1"}
    finally:
        ray.shutdown()


def listening_addresses(port: int) -> set:
    """The addresses a TCP port listens on, from /proc/net/tcp{,6} (state 0A = LISTEN)."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:
                continue
            if v6:
                found.add("::" if int(addr, 16) == 0 else addr)
            else:
                found.add(".".join(str(b) for b in bytes.fromhex(addr)[::-1]))
    return found
