//! What Canopy needs from an IaaS (seed §1, §2, §7, §8), as one trait: tenant networks,
//! servers (VMs) that boot straight into `canopy agent`, ports (NICs) in a tenant's
//! network that can be attached to a server, and public IPs bound to ports.
//!
//! Every object is named by the caller, and every call is idempotent on that name: creating
//! what exists returns it, deleting what is gone succeeds. A cloud controller that crashes
//! at any point finds everything it made again by listing, so nothing is orphaned. The
//! local provider ([`local`]) is the embedded default; an OpenStack provider implements the
//! same trait with Neutron networks and ports and Nova servers.

pub mod local;
mod types;

pub use types::*;

/// The IaaS, as the cloud controller uses it.
#[async_trait::async_trait]
pub trait CloudProvider: Send + Sync {
    /// The provider's name (`local`, `openstack`).
    fn name(&self) -> &'static str;

    /// Creates the network, or returns it if one by this name exists (with the same
    /// tenant; another tenant's network by that name is a [`CloudError::Conflict`]).
    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<Network, CloudError>;
    /// Deletes a network and everything still on it.
    async fn delete_network(&self, name: &str) -> Result<(), CloudError>;
    /// Every network of this cluster.
    async fn list_networks(&self) -> Result<Vec<Network>, CloudError>;

    /// Creates a server and starts it (its agent boots with `spec.bootstrap`), or returns
    /// the server of that name. Returns once the server exists; it is `Active` when it
    /// booted.
    async fn create_server(&self, spec: &ServerSpec) -> Result<Server, CloudError>;
    /// Boots a spare server for the warm pool (tenant and network empty, status
    /// [`ServerStatus::Spare`]), or returns the server of that name.
    async fn create_spare(&self, spec: &SpareSpec) -> Result<Server, CloudError>;
    /// Gives a spare server to a tenant: its NIC in `spec.nic.network`, its agent started
    /// with `spec.bootstrap`, its tags. `spec.name` is the spare's (a server keeps its name)
    /// and `spec.flavor` must be its flavor. Claiming a server that `spec` already
    /// describes returns it; claiming any other server that is not a spare is a
    /// [`CloudError::Conflict`].
    async fn claim_spare(&self, spec: &ServerSpec) -> Result<Server, CloudError>;
    /// Stops and deletes a server with its NIC; ports attached to it are detached (not
    /// deleted).
    async fn delete_server(&self, name: &str) -> Result<(), CloudError>;
    /// One server, if it exists.
    async fn server(&self, name: &str) -> Result<Option<Server>, CloudError>;
    /// Every server of this cluster.
    async fn list_servers(&self) -> Result<Vec<Server>, CloudError>;

    /// Creates a port (with an address from the network's subnet unless one is given), or
    /// returns the port of that name.
    async fn create_port(&self, spec: &PortSpec) -> Result<Port, CloudError>;
    /// Plugs a port into a server: its device appears inside the server as
    /// [`Port::device`]. Attaching it again to the same server is a no-op.
    async fn attach_port(&self, port: &str, server: &str) -> Result<Port, CloudError>;
    /// Unplugs a port from its server (its device disappears from the server, or from the
    /// pod it was moved into); the port and its address are kept, to be attached again.
    /// Detaching a port attached nowhere is a no-op; a server's own NIC is a
    /// [`CloudError::Conflict`].
    async fn detach_port(&self, port: &str) -> Result<Port, CloudError>;
    /// Deletes a port (detaching it first).
    async fn delete_port(&self, name: &str) -> Result<(), CloudError>;
    /// Every port of this cluster.
    async fn list_ports(&self) -> Result<Vec<Port>, CloudError>;

    /// Allocates an address of the public network, or returns the public IP of that name.
    /// A provider without a public network answers [`CloudError::Invalid`].
    async fn create_public_ip(&self, spec: &PublicIpSpec) -> Result<PublicIp, CloudError>;
    /// Binds a public IP to a port: the public network reaches the port at the address,
    /// and the port may send from it. Binding it again to the same port is a no-op; a
    /// public IP bound elsewhere is a [`CloudError::Conflict`].
    async fn bind_public_ip(&self, name: &str, port: &str) -> Result<PublicIp, CloudError>;
    /// Releases a public IP (unbinding it first). Deleting a port unbinds its public IPs
    /// but keeps them.
    async fn delete_public_ip(&self, name: &str) -> Result<(), CloudError>;
    /// Every public IP of this cluster.
    async fn list_public_ips(&self) -> Result<Vec<PublicIp>, CloudError>;
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the network {0:?} has no free address left")]
    Exhausted(String),
    #[error("{0}")]
    Failed(String),
}

impl CloudError {
    pub fn not_found(kind: &'static str, name: &str) -> Self {
        CloudError::NotFound {
            kind,
            name: name.to_string(),
        }
    }
}
