//! The daemon's one netlink handle (`rtnetlink`): the Vip host routes it announces, kept in
//! the configured table only and marked with a protocol number of its own, and the
//! *managed* neighbour entries of its backends' next hops.
//!
//! `bpf_fib_lookup` reads the kernel's neighbour table but never resolves a missing entry
//! itself, so each backend's next hop gets a managed entry (`NTF_EXT_MANAGED`, Linux 5.16+),
//! which the kernel keeps resolved on its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::{LinkAttribute, LinkXdp},
        neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};

/// `rtm_protocol` of the routes mlb adds (unassigned in iproute2's `rt_protos`): what
/// marks a route in the announce table as ours, so that nothing else there is touched.
/// `ip route show table T proto 250` lists them.
pub const RTPROT_MLB: u8 = 250;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{what}: {error}")]
    Request {
        what: String,
        error: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |error| NetlinkError::Request {
        what: what.into(),
        error,
    }
}

/// A netlink connection, driven by a task on the current tokio runtime. Cheap to clone.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its connection task (needs a tokio runtime).
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The host addresses mlb has routes for in `table`.
    pub async fn routes(&self, table: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let mut dump = self.handle.route().get(query).execute();
            while let Some(route) = dump
                .try_next()
                .await
                .map_err(request(format!("listing routes of table {table}")))?
            {
                if route.header.protocol != RouteProtocol::Other(RTPROT_MLB)
                    || table_of(&route) != table
                {
                    continue;
                }
                if let Some(addr) = destination(&route) {
                    found.push(addr);
                }
            }
        }
        Ok(found)
    }

    /// Adds (or replaces) the host route `addr/32` (`/128`) `dev lo` in `table`.
    pub async fn add_route(&self, table: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let route = host_route(table, addr)?;
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(request(format!("adding the route {addr} to table {table}")))
    }

    /// Removes mlb's host route for `addr` from `table`.
    pub async fn del_route(&self, table: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let route = host_route(table, addr)?;
        self.handle
            .route()
            .del(route)
            .execute()
            .await
            .map_err(request(format!(
                "removing the route {addr} from table {table}"
            )))
    }

    /// Gives the next hop of `backend` (the backend itself when on-link) a managed
    /// neighbour entry on the device the kernel routes it through.
    pub async fn manage_neighbour(&self, backend: IpAddr) -> Result<(), NetlinkError> {
        let (ifindex, hop) = self.route_get(backend).await?;
        let mut add = self
            .handle
            .neighbours()
            .add(ifindex, hop)
            .state(NeighbourState::None)
            .replace();
        add.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        add.execute().await.map_err(request(format!(
            "managed neighbour {hop} for backend {backend}"
        )))
    }

    /// The id of the XDP program attached to the interface `name` (`None`: none, or no
    /// such interface).
    pub async fn xdp_prog_id(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(None),
            // No such device.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None);
            }
            Err(error) => {
                return Err(NetlinkError::Request {
                    what: format!("reading interface {name}"),
                    error,
                });
            }
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// `ip route get ADDR`: the output device and the next hop.
    async fn route_get(&self, addr: IpAddr) -> Result<(u32, IpAddr), NetlinkError> {
        let query = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let route = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_next()
            .await
            .map_err(request(format!("looking up the route to {addr}")))?
            .ok_or_else(|| NetlinkError::Other(format!("no route to {addr}")))?;
        let mut ifindex = None;
        let mut hop = addr;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => ifindex = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => hop = IpAddr::V4(*g),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => hop = IpAddr::V6(*g),
                _ => {}
            }
        }
        let ifindex =
            ifindex.ok_or_else(|| NetlinkError::Other(format!("no device routes {addr}")))?;
        Ok((ifindex, hop))
    }
}

/// `addr/32` (`/128`) `dev lo scope link proto 250 table T`.
fn host_route(table: u32, addr: IpAddr) -> Result<RouteMessage, NetlinkError> {
    let lo = loopback_index()?;
    let message = match addr {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(lo)
            .table_id(table)
            .protocol(RouteProtocol::Other(RTPROT_MLB))
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(lo)
            .table_id(table)
            .protocol(RouteProtocol::Other(RTPROT_MLB))
            .build(),
    };
    Ok(message)
}

fn loopback_index() -> Result<u32, NetlinkError> {
    let name = c"lo";
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(NetlinkError::Other(format!(
            "no loopback device: {}",
            std::io::Error::last_os_error()
        ))),
        index => Ok(index),
    }
}

/// The table a route is in (`RTA_TABLE` when present: ids above 255 need it).
fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// The destination of a host route, if it is one.
fn destination(route: &RouteMessage) -> Option<IpAddr> {
    let full = match route.header.address_family {
        AddressFamily::Inet => 32,
        AddressFamily::Inet6 => 128,
        _ => return None,
    };
    if route.header.destination_prefix_length != full {
        return None;
    }
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}
