"""gRPC backends for the xDS tests: each answers /test.Who/Name with its
own name (raw bytes, no protobuf). Usage: backend.py NAME...; prints one
JSON line {NAME: PORT, ...} once all listen, then serves until stdin closes."""
import json
import sys
from concurrent import futures

import grpc


def server(name):
    def who(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Who", {"Name": grpc.unary_unary_rpc_method_handler(who)}
    )
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    s.add_generic_rpc_handlers((handler,))
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    return s, port


def main():
    servers = {}
    ports = {}
    for name in sys.argv[1:]:
        servers[name], ports[name] = server(name)
    print(json.dumps(ports), flush=True)
    sys.stdin.read()
    for s in servers.values():
        s.stop(0)


main()
