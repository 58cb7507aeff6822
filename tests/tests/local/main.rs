//! Tests of what an operator types and installs: the command line and the
//! deployment files (systemd units, Kubernetes manifests, dashboards, alert
//! rules). Most need no root and no namespace.

mod cli;
mod deploy;
