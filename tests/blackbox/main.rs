//! Black-box tests: start the real `switchyard` binary and talk to it over
//! real sockets on 127.0.0.1.

mod cli;
mod clients;
mod cluster;
mod compression;
mod connections;
mod dashboard;
mod dns;
mod drain;
mod federation;
mod grpc;
mod health;
mod house;
mod http2;
mod kv;
mod lifecycle;
mod operator;
mod policy;
mod proxy;
mod queries;
mod readme;
mod registry_api;
mod restart;
mod routes;
mod security;
mod sessions;
mod support;
mod tcp;
mod tonic_grpc;
mod transports;
mod upstream_http1;
mod upstream_tls;
mod xds;
