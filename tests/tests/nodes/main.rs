//! The privileged end-to-end tests: real containerd, peermirror daemons and
//! clients in network namespaces (they need root). One binary, one module
//! per file; the tests of different modules take turns
//! ([`peermirror_tests::turn`]).

mod airgap;
mod blame;
mod bootstrap;
mod cluster;
mod crawl;
mod daemonset;
mod dataplane;
mod fanout;
mod hostile;
mod k3s;
mod load;
mod observe;
mod readiness;
mod relays;
mod resume;
mod serving;
mod single_node;
mod spread;
mod store;
mod tags;
mod tls;
mod uninstall;
