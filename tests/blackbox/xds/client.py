"""A proxyless gRPC client of Switchyard's xDS server: grpcio's own xDS
resolver and balancers (GRPC_XDS_BOOTSTRAP names the server). Usage:
client.py TARGET; then per stdin line `calls N DEADLINE [KEY]` it makes N
unary calls of /test.Who/Name on one channel (header x-key: KEY when given)
and prints {"counts": {BACKEND: CALLS}, "errors": [...]} as one JSON line."""
import json
import sys

import grpc


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    call = channel.unary_unary("/test.Who/Name")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        n, deadline = int(words[1]), float(words[2])
        metadata = [("x-key", words[3])] if len(words) > 3 else None
        counts, errors = {}, []
        for _ in range(n):
            try:
                name = call(b"", timeout=deadline, metadata=metadata).decode()
                counts[name] = counts.get(name, 0) + 1
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
        print(json.dumps({"counts": counts, "errors": errors}), flush=True)


main()
