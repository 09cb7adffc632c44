#!/usr/bin/env python3
"""A test backend: tells every TCP connection and UDP datagram which backend it reached.

HTTP (--http): GET answers 200 with "<name>\n" (500 while --fail-file exists).
TCP: on connect sends "<name>\n", then echoes each line back as "<name> <line>\n".
UDP: answers each datagram with "<name> <datagram>", from the address it was sent to
(a DSR backend must answer from the Vip, so UDP binds each --vip address).
TCP listens on IPv4 and IPv6, all addresses (so Vips on lo are served too).
"""
import argparse
import http.server
import os
import socket
import socketserver
import threading


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--http", type=int, action="append", default=[])
    parser.add_argument("--fail-file", help="answer HTTP 500 while this file exists")
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--vip", action="append", default=[])
    args = parser.parse_args()
    name = args.name.encode()

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self):
            try:
                self.wfile.write(name + b"\n")
                for line in self.rfile:
                    self.wfile.write(name + b" " + line)
            except (ConnectionResetError, BrokenPipeError):
                pass  # a health check that connects and closes

    class Http(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            failing = args.fail_file and os.path.exists(args.fail_file)
            status = 500 if failing else 200
            body = name + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(name + b" " + data, self.client_address)

    class TcpServer(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6
        request_queue_size = 1024

    class UdpServer(socketserver.ThreadingUDPServer):
        daemon_threads = True
        allow_reuse_address = True

    class UdpServer6(UdpServer):
        address_family = socket.AF_INET6

    class HttpServer(TcpServer):
        pass

    servers = [TcpServer(("::", p), Tcp) for p in args.tcp]
    servers += [HttpServer(("::", p), Http) for p in args.http]
    for vip in args.vip:
        kind = UdpServer6 if ":" in vip else UdpServer
        servers += [kind((vip, p), Udp) for p in args.udp]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
