"""py-consul (a real Consul client) against a Switchyard agent: KV, a
blocking KV read, sessions and locks, a transaction, a prepared query.
Run by tests/blackbox/clients.rs: python py_consul.py <api host:port>.
Exits non-zero (with the assertion) on any difference."""

import base64
import sys
import threading

import consul

host, port = sys.argv[1].rsplit(":", 1)
c = consul.Consul(host=host, port=int(port))

# KV: put, get, a missing key (None, with an index), flags, recurse, keys.
assert c.kv.put("cfg/a", "x") is True
index, data = c.kv.get("cfg/a")
assert data["Value"] == b"x", data
index, missing = c.kv.get("cfg/missing")
assert missing is None and int(index) > 0, (index, missing)
assert c.kv.put("cfg/sub/b", "y", flags=5) is True
index, entries = c.kv.get("cfg/", recurse=True)
assert [e["Key"] for e in entries] == ["cfg/a", "cfg/sub/b"], entries
assert entries[1]["Flags"] == 5
index, keys = c.kv.get("cfg/", keys=True, separator="/")
assert keys == ["cfg/a", "cfg/sub/"], keys
# CAS.
assert c.kv.put("cfg/a", "z", cas=0) is False
assert c.kv.put("cfg/a", "z", cas=int(data["ModifyIndex"])) is True

# A blocking read returns when the key changes.
index, data = c.kv.get("cfg/a")
got = {}


def watch():
    got["answer"] = c.kv.get("cfg/a", index=index, wait="30s")


t = threading.Thread(target=watch)
t.start()
c.kv.put("cfg/a", "after")
t.join(timeout=20)
assert not t.is_alive(), "the blocking read did not wake"
assert got["answer"][1]["Value"] == b"after", got

# Sessions and a lock: ephemeral keys go with their session.
sid = c.session.create(name="py", ttl=10, behavior="delete", lock_delay=0)
other = c.session.create(name="other", lock_delay=0)
assert c.kv.put("svc/leader", "me", acquire=sid) is True
assert c.kv.put("svc/leader", "you", acquire=other) is False
index, info = c.session.info(sid)
assert info["ID"] == sid and info["Behavior"] == "delete", info
assert c.session.renew(sid)["ID"] == sid
c.session.destroy(sid)
index, gone = c.kv.get("svc/leader")
assert gone is None, gone
assert c.kv.put("svc/leader", "you", acquire=other) is True
index, sessions = c.session.list()
assert [s["ID"] for s in sessions] == [other], sessions
assert c.kv.put("svc/leader", "", release=other) is True

# A transaction.
value = base64.b64encode(b"1").decode()
result = c.txn.put(
    [
        {"KV": {"Verb": "set", "Key": "t/x", "Value": value}},
        {"KV": {"Verb": "get", "Key": "t/x"}},
    ]
)
assert result["Errors"] is None and len(result["Results"]) == 2, result

# A prepared query over a registered service.
c.agent.service.register("web", service_id="web-1", port=80)
query = c.query.create("web", name="webq")
executed = c.query.execute("webq")
assert [n["Service"]["ID"] for n in executed["Nodes"]] == ["web-1"], executed
c.query.delete(query["ID"])

# Deletes.
assert c.kv.delete("cfg/", recurse=True) is True
index, none = c.kv.get("cfg/", recurse=True)
assert none is None, none
print("py-consul: all good")
