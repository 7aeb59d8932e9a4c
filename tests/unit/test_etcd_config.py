"""[etcd] and --etcd: parsed into EtcdConfig, refused with the field named; the key helpers."""
import base64

import pytest

from pool.cluster.config import load_config
from pool.cluster.etcd import parse_endpoints, prefix_end
from pool.cluster.etcdstate import ClusterKeys
from pool.errors import SpecError


def test_etcd_table_and_flags(tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text('[etcd]\nendpoints = "http://10.0.0.9:2379, 10.0.0.10"\ncluster = "blue"\n'
                    'ttl = 5\nagent_token_file = "/etc/pool/agent.token"\n')
    cfg = load_config(conf)
    assert [e.url for e in cfg.etcd.endpoints] == ["http://10.0.0.9:2379", "http://10.0.0.10:2379"]
    assert (cfg.etcd.cluster, cfg.etcd.ttl, str(cfg.etcd.agent_token_file)) == \
        ("blue", 5, "/etc/pool/agent.token")
    assert cfg.local_node is False                       # coordinators on etcd run no copies
    flagged = load_config(conf, etcd="http://127.0.0.1:2379", agent_token_file="/t")
    assert [e.url for e in flagged.etcd.endpoints] == ["http://127.0.0.1:2379"]
    assert load_config(None).etcd is None


@pytest.mark.parametrize("text, field", [
    ('[etcd]\ncluster = "x"\n', "etcd.endpoints"),
    ('[etcd]\nendpoints = "https://10.0.0.9:2379"\n', "etcd.endpoints"),
    ('[etcd]\nendpoints = "10.0.0.9"\nttl = 1\n', "ttl"),
    ('[service]\nlocal_node = true\n[etcd]\nendpoints = "10.0.0.9"\n', "local_node"),
])
def test_bad_etcd_settings_name_the_field(tmp_path, text, field):
    conf = tmp_path / "s.toml"
    conf.write_text(text)
    with pytest.raises(SpecError, match=field):
        load_config(conf)


def test_prefix_end_and_keys():
    assert base64.b64decode(prefix_end("/a/")) == b"/a0"
    keys = ClusterKeys("blue")
    assert keys.parse(keys.agent("n2")) == ("agents", "n2")
    assert keys.parse(keys.route("abc")) == ("routes", "abc")
    assert keys.parse(keys.ship_lock("n2", "t")) == ("locks", "ship/n2/t")
    assert keys.parse("/elsewhere/x") is None
    with pytest.raises(ValueError, match="not an etcd endpoint"):
        parse_endpoints("ftp://x")
