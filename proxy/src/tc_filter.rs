//! The cls_bpf filters at an interface's ingress (`tc filter show dev IF ingress`), read
//! over a blocking netlink socket: the agent finds the filter a crashed run left, to replace
//! it in place rather than add a second one, and `proxy cleanup` finds what to remove. And
//! the removal of a clsact qdisc the agent added, once no filter is left under it.
//!
//! An agent's filter is told apart by its handle, which is the agent's routing table (as
//! `table-N` tells its pins apart), and by its program's name.

use std::io;

use rtnetlink::{
    packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

/// A cls_bpf filter at ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
    /// The name of the program (`TCA_BPF_NAME`).
    pub name: String,
}

/// The cls_bpf filters at `ifindex` ingress, in dump order. None when the interface has no
/// clsact (or ingress) qdisc.
pub fn ingress_bpf_filters(ifindex: u32) -> io::Result<Vec<BpfFilter>> {
    Ok(dump(ifindex, TcHandle::MIN_INGRESS)?
        .iter()
        .filter_map(bpf_filter)
        .collect())
}

/// How many filters of any kind (cls_bpf, u32, flower, ...) sit under `ifindex`'s clsact
/// qdisc, ingress and egress: a qdisc the agent added may have been taken into use by
/// someone else (another agent, another tool), and then it must stay.
pub fn clsact_filter_count(ifindex: u32) -> io::Result<usize> {
    let with_kind = |messages: Vec<TcMessage>| {
        messages
            .iter()
            .filter(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(_)))
            })
            .count()
    };
    Ok(with_kind(dump(ifindex, TcHandle::MIN_INGRESS)?)
        + with_kind(dump(ifindex, TcHandle::MIN_EGRESS)?))
}

/// Whether `ifindex` has a clsact qdisc whose filters, ingress and egress, are all cls_bpf
/// filters that `ours` accepts, and there is one: a qdisc that holds nothing but an agent's
/// filter (the lines that only name a filter's priority do not count).
pub fn clsact_holds_only(ifindex: u32, ours: impl Fn(&BpfFilter) -> bool) -> io::Result<bool> {
    let filters = |minor| -> io::Result<Vec<TcMessage>> {
        Ok(dump(ifindex, minor)?
            .into_iter()
            .filter(|m| {
                u32::from(m.header.handle) != 0
                    && m.attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(_)))
            })
            .collect())
    };
    let ingress = filters(TcHandle::MIN_INGRESS)?;
    Ok(!ingress.is_empty()
        && ingress
            .iter()
            .all(|m| bpf_filter(m).is_some_and(|f| ours(&f)))
        && filters(TcHandle::MIN_EGRESS)?.is_empty())
}

/// What [`remove_clsact`] did.
pub enum ClsactRemoval {
    Removed,
    /// Other filters are under it (another agent's, another tool's): left in place.
    KeptInUse(usize),
}

/// Deletes the clsact qdisc the agent added for the netlink attach (`tc qdisc del dev IF
/// clsact`), once its own filter is gone, unless filters of others are under it: deleting
/// the qdisc would take them with it.
pub async fn remove_clsact(
    handle: &rtnetlink::Handle,
    ifindex: u32,
) -> Result<ClsactRemoval, rtnetlink::Error> {
    match clsact_filter_count(ifindex) {
        Ok(0) => {}
        Ok(others) => return Ok(ClsactRemoval::KeptInUse(others)),
        // Cannot tell: keeping an empty qdisc costs nothing, deleting a used one does.
        Err(_) => return Ok(ClsactRemoval::KeptInUse(0)),
    }
    let mut request = handle.qdisc().del(ifindex as i32);
    let message = request.message_mut();
    message.header.parent = TcHandle::CLSACT;
    message.header.handle = TcHandle::from(0xffff_0000);
    message
        .attributes
        .push(TcAttribute::Kind("clsact".to_owned()));
    request.execute().await.map(|()| ClsactRemoval::Removed)
}

/// The filter messages under clsact's `minor` hook (ingress or egress) of `ifindex`.
fn dump(ifindex: u32, minor: u16) -> io::Result<Vec<TcMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = TcMessage::with_index(ifindex as i32);
    message.header.parent = TcHandle {
        major: 0xffff,
        minor,
    };
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut filters = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(io::Error::other)?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(filters),
                NetlinkPayload::Error(e) => {
                    let e = e.to_io();
                    // No qdisc to hold filters: none.
                    return match e.raw_os_error() {
                        Some(libc::EINVAL | libc::ENOENT) => Ok(Vec::new()),
                        _ => Err(e),
                    };
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                    filters.push(m);
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            // Netlink messages are 4-byte aligned.
            offset += (length + 3) & !3;
        }
    }
}

fn bpf_filter(message: &TcMessage) -> Option<BpfFilter> {
    let handle = u32::from(message.header.handle);
    if handle == 0 {
        // The line of the filter's priority and protocol, not a filter.
        return None;
    }
    let mut kind = None;
    let mut name = None;
    for attribute in &message.attributes {
        match attribute {
            TcAttribute::Kind(k) => kind = Some(k.as_str()),
            TcAttribute::Options(options) => {
                for option in options {
                    if let TcOption::Bpf(TcFilterBpfOption::ProgName(n)) = option {
                        name = Some(n.clone());
                    }
                }
            }
            _ => {}
        }
    }
    (kind == Some(TcFilterBpf::KIND)).then(|| BpfFilter {
        priority: (message.header.info >> 16) as u16,
        handle,
        name: name.unwrap_or_default(),
    })
}
