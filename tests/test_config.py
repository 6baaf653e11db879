"""Configuration loading: the examples in deploy/ load, and every kind of
mistake is refused with the file, the key and what is expected."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MIN = '[node]\nid = 1\nlisten = "127.0.0.1:6432"\n'


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("*.toml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_deploy_examples_load(path):
    cfg = load_config(path)
    assert cfg.node.id >= 1 and cfg.source == str(path)
    assert all(p.id != cfg.node.id for p in cfg.peers)


def test_three_node_and_referee_examples_are_consistent():
    cfgs = [load_config(ROOT / "deploy" / f"node{i}.toml") for i in (1, 2, 3)]
    for c in cfgs:
        assert sorted([c.node.id] + [p.id for p in c.peers]) == [1, 2, 3]
    ref = [load_config(ROOT / "deploy" / "2-nodes-referee" / f"node{i}.toml") for i in (1, 2)]
    assert all(c.referee is not None and len(c.peers) == 1 for c in ref)


def test_defaults():
    cfg = parse_config(MIN)
    assert cfg.postgres.port == 5432 and cfg.timeouts.shutdown_grace_ms == 30000
    assert cfg.tls is None and cfg.referee is None and cfg.peers == ()


@pytest.mark.parametrize("text,message", [
    ("[node]\nid = 1\n", "n.toml: [node] listen: required value is missing"),
    ("", "n.toml: [node]: required value is missing"),
    (MIN + "colour = 1\n", "n.toml: [node]: unknown key 'colour'"),
    (MIN + "[postgress]\n", "n.toml: top level: unknown key 'postgress'"),
    ('[node]\nid = "one"\nlisten = "a:1"\n', "[node] id: expected an integer, got a string ('one')"),
    ('[node]\nid = 0\nlisten = "a:1"\n', "[node] id: expected a positive integer, got 0"),
    ('[node]\nid = 1\nlisten = "nohost"\n', '[node] listen: expected "host:port"'),
    (MIN + "[postgres]\nport = true\n", "[postgres] port: expected an integer, got a boolean"),
    (MIN + '[log]\nlevel = "chatty"\n', "[log] level: expected one of debug, info, warning, error"),
    (MIN + "[[peers]]\nid = 2\n", "[[peers]] #1 client_address: required value is missing"),
    ("peers = 3\n" + MIN, "[[peers]]: expected an array of tables"),
    (MIN + '[[peers]]\nid = 1\nclient_address = "a:1"\nnode_address = "a:2"\n',
     "node ids must be unique"),
    (MIN + '[tls]\ncert_file = "/nonexistent.crt"\nkey_file = "/x.key"\n',
     "[tls] cert_file: file '/nonexistent.crt' does not exist"),
    (MIN + "[limits]\nwrite_buffer_high_bytes = 10\nwrite_buffer_low_bytes = 20\n",
     "write_buffer_low_bytes must not exceed"),
    ("[node\n", "n.toml: not valid TOML"),
])
def test_errors_name_file_key_and_expectation(text, message):
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "n.toml")
    assert message in str(ei.value)


def test_password_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_PG_PW", "from-env")
    cfg = parse_config(MIN + '[postgres]\npassword_env = "MY_PG_PW"\n')
    assert cfg.postgres.password() == "from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    cfg = parse_config(MIN + f'[postgres]\npassword_file = "{f}"\n')
    assert cfg.postgres.password() == "from-file"


def test_cli_check_config_and_errors(tmp_path):
    good = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config",
                           str(ROOT / "deploy" / "node1.toml")], capture_output=True, text=True,
                          cwd=ROOT)
    assert good.returncode == 0 and "OK" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MIN + "typo = 1\n")
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1
    assert f"{bad}: [node]: unknown key 'typo'" in res.stderr
    missing = subprocess.run([sys.executable, "-m", "proxy.cli", "--config", "/no/such.toml"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "cannot read configuration file" in missing.stderr
    helptext = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--help"],
                              capture_output=True, text=True, cwd=ROOT).stdout
    for opt in ("--nodes", "--dir", "--port", "--keep", "--log-level"):
        assert opt in helptext


def test_init_cluster_command(workdir):
    """init-cluster refuses a server whose settings fall short, naming each
    setting, and sets a ready one up idempotently."""
    from proxy.pgserver import LocalPostgres
    bad = LocalPostgres(workdir / "init_bad", fsync=False,
                        settings={"wal_level": "replica", "max_prepared_transactions": "0"})
    bad.init().start()
    good = LocalPostgres(workdir / "init_good", fsync=False).init().start()
    def init(pg) -> subprocess.CompletedProcess:
        cfg = pg.base / "n.toml"
        cfg.write_text(f'[node]\nid = 1\nlisten = "127.0.0.1:1"\ninternode_listen = '
                       f'"127.0.0.1:2"\n[postgres]\nhost = "{pg.sockdir}"\nport = {pg.port}\n'
                       '[[peers]]\nid = 2\nclient_address = "127.0.0.1:3"\n'
                       'node_address = "127.0.0.1:4"\n')
        return subprocess.run([sys.executable, "-m", "proxy.cli", "init-cluster", "--config",
                               str(cfg)], capture_output=True, text=True, cwd=ROOT)
    try:
        refused = init(bad)
        assert refused.returncode == 1
        assert "node 1 is not ready" in refused.stderr
        assert "wal_level is replica, needs = logical" in refused.stderr
        assert "max_prepared_transactions is 0, needs >= 100" in refused.stderr
        for _ in range(2):                      # running it again is harmless
            ok = init(good)
            assert ok.returncode == 0, ok.stderr
            assert "node 1: initialized for a cluster of nodes [1, 2]" in ok.stdout
        out = good.psql("SELECT (SELECT count(*) FROM pg_replication_slots "
                        "WHERE slot_name = 'mtm_slot_2'), (SELECT count(*) FROM mtm.nodes), "
                        "(SELECT count(*) FROM pg_publication WHERE pubname = 'mtm_pub')")
        assert out.strip() == "1|2|1"
        assert bad.psql("SELECT to_regclass('mtm.nodes') IS NULL").strip() == "t"  # untouched
    finally:
        bad.stop("immediate")
        good.stop("immediate")
