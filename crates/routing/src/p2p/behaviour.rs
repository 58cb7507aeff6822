//! The swarm's network behaviour: every protocol the P2P port speaks, and
//! the connection limits. The event loop drives it; the lookups borrow it.

use std::time::Duration;

use libp2p::request_response::ProtocolSupport;
use libp2p::swarm::NetworkBehaviour;
#[cfg(test)]
use libp2p::swarm::Swarm;
use libp2p::{StreamProtocol, connection_limits, identify, kad, ping, request_response};

use super::records::ProviderStore;
#[cfg(test)]
use super::records::StoreLimits;
use super::rendezvous::{self, Ask, Reply};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Bounds handshakes in progress (hosts without the key cost a pnet
    /// and noise attempt each) and connections.
    pub(super) limits: connection_limits::Behaviour,
    pub kad: kad::Behaviour<ProviderStore>,
    pub(super) identify: identify::Behaviour,
    /// Finds dead connections (a peer whose link went silent) in seconds
    /// rather than at the end of TCP's retransmission timeout.
    pub(super) ping: ping::Behaviour,
    /// The first-deploy fan-out's asks and answers ([`rendezvous`]).
    pub(super) fanout: request_response::json::Behaviour<Ask, Reply>,
}

pub(super) fn fanout_behaviour() -> request_response::json::Behaviour<Ask, Reply> {
    request_response::json::Behaviour::new(
        [(
            StreamProtocol::new(rendezvous::PROTOCOL),
            ProtocolSupport::Full,
        )],
        request_response::Config::default().with_request_timeout(FANOUT_TIMEOUT),
    )
}

/// How long an ask of the fan-out rendezvous may take.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// A swarm that listens nowhere and knows nobody, for unit tests of the
/// parts.
#[cfg(test)]
pub(super) fn test_swarm() -> Swarm<Behaviour> {
    use libp2p::core::Transport as _;
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let peer_id = keypair.public().to_peer_id();
    let transport = libp2p::core::transport::MemoryTransport::default()
        .upgrade(libp2p::core::upgrade::Version::V1)
        .authenticate(libp2p::noise::Config::new(&keypair).expect("noise"))
        .multiplex(libp2p::yamux::Config::default())
        .boxed();
    let behaviour = Behaviour {
        limits: connection_limits::Behaviour::new(limits()),
        kad: kad::Behaviour::new(peer_id, ProviderStore::new(peer_id, StoreLimits::default())),
        identify: identify::Behaviour::new(identify::Config::new(
            "/test/1".into(),
            keypair.public(),
        )),
        ping: ping::Behaviour::default(),
        fanout: fanout_behaviour(),
    };
    Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor(),
    )
}

/// Connection limits of the P2P port.
pub(super) fn limits() -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(256))
        .with_max_established_incoming(Some(512))
        .with_max_established(Some(1024))
        .with_max_established_per_peer(Some(4))
}
