//! Wire facts: hand-built protobuf bytes (as multipassd 1.16 puts them on the wire) decode to
//! the fields our `.proto` promises.

use mpool_multipass::proto::multipass as pb;
use prost::Message;

#[test]
fn ssh_info_reply() {
    // ssh_info (1): map entry { key (1) = "vm", value (2) = SSHInfo { port (1) = 2222,
    // priv_key_base64 (2) = "KEY", host (3) = "10.0.0.5", username (4) = "ubuntu" } }, log_line (2) = "l"
    let info: &[u8] = &[
        0x08, 0xae, 0x11, // port = 2222
        0x12, 0x03, b'K', b'E', b'Y', // priv_key_base64
        0x1a, 0x08, b'1', b'0', b'.', b'0', b'.', b'0', b'.', b'5', // host
        0x22, 0x06, b'u', b'b', b'u', b'n', b't', b'u', // username
    ];
    let mut entry = vec![0x0a, 0x02, b'v', b'm', 0x12, info.len() as u8];
    entry.extend_from_slice(info);
    let mut bytes = vec![0x0a, entry.len() as u8];
    bytes.extend_from_slice(&entry);
    bytes.extend_from_slice(&[0x12, 0x01, b'l']);
    let r = pb::SshInfoReply::decode(bytes.as_slice()).unwrap();
    let i = &r.ssh_info["vm"];
    assert_eq!(
        (i.port, i.priv_key_base64.as_str(), i.host.as_str(), i.username.as_str()),
        (2222, "KEY", "10.0.0.5", "ubuntu")
    );
    assert_eq!(r.log_line, "l");
}

#[test]
fn restore_request() {
    // instance (1) = "vm", snapshot (2) = "clean", destructive (3) = true, verbosity_level (4) = 1
    let bytes = [0x0a, 0x02, b'v', b'm', 0x12, 0x05, b'c', b'l', b'e', b'a', b'n', 0x18, 0x01, 0x20, 0x01];
    let r = pb::RestoreRequest::decode(&bytes[..]).unwrap();
    assert_eq!((r.instance.as_str(), r.snapshot.as_str(), r.destructive, r.verbosity_level), ("vm", "clean", true, 1));
    assert_eq!(r.encode_to_vec(), bytes, "and encodes back to the same bytes");
}

#[test]
fn list_reply_as_seen_on_a_live_daemon() {
    // §0.1: an empty list is `0a00 2200` (instance_list arm present but empty, update_info empty).
    let r = pb::ListReply::decode(&[0x0a, 0x00, 0x22, 0x00][..]).unwrap();
    assert_eq!(r.list_contents, Some(pb::list_reply::ListContents::InstanceList(pb::InstancesList::default())));
    assert_eq!(r.update_info, Some(pb::UpdateInfo::default()));
    // snapshots=true: `1200 2200`.
    let r = pb::ListReply::decode(&[0x12, 0x00, 0x22, 0x00][..]).unwrap();
    assert!(matches!(r.list_contents, Some(pb::list_reply::ListContents::SnapshotList(_))));
    // One instance: name (1) = "a", instance_status (2) = { status (1) = SUSPENDED (8) }.
    let inst = [0x0a, 0x01, b'a', 0x12, 0x02, 0x08, 0x08];
    let mut list = vec![0x0a, inst.len() as u8];
    list.extend_from_slice(&inst);
    let mut bytes = vec![0x0a, list.len() as u8];
    bytes.extend_from_slice(&list);
    let r = pb::ListReply::decode(bytes.as_slice()).unwrap();
    let Some(pb::list_reply::ListContents::InstanceList(l)) = r.list_contents else { panic!("instance list") };
    assert_eq!(l.instances[0].name, "a");
    assert_eq!(l.instances[0].instance_status.as_ref().unwrap().status(), pb::instance_status::Status::Suspended);
}

#[test]
fn stop_request() {
    // instance_names (1) = { instance_name (1) = "a" }, time_minutes (2) = 0 (absent),
    // verbosity_level (4) = 2, force_stop (5) = true (1.14+)
    let bytes = [0x0a, 0x03, 0x0a, 0x01, b'a', 0x20, 0x02, 0x28, 0x01];
    let r = pb::StopRequest::decode(&bytes[..]).unwrap();
    assert_eq!(r.instance_names.unwrap().instance_name, vec!["a"]);
    assert_eq!((r.time_minutes, r.cancel_shutdown, r.verbosity_level, r.force_stop), (0, false, 2, true));
}

#[test]
fn launch_and_start_error_details() {
    // LaunchError { error_codes (1) = [INVALID_HOSTNAME (3)] } (1.13+ numbering), packed.
    let le = pb::LaunchError::decode(&[0x0a, 0x01, 0x03][..]).unwrap();
    assert_eq!(le.error_codes().collect::<Vec<_>>(), vec![pb::launch_error::ErrorCodes::InvalidHostname]);
    // StartError { instance_errors (1) = { "x": INSTANCE_DELETED (2) } }
    let se = pb::StartError::decode(&[0x0a, 0x05, 0x0a, 0x01, b'x', 0x10, 0x02][..]).unwrap();
    assert_eq!(se.instance_errors["x"], pb::start_error::ErrorCode::InstanceDeleted as i32);
}

#[test]
fn info_request_skips_field_two() {
    // instance_snapshot_pairs (1) = { instance_name (1) = "a", snapshot_name (2) = "s" },
    // verbosity_level (3) = 1, no_runtime_information (4) = true
    let bytes = [0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b's', 0x18, 0x01, 0x20, 0x01];
    let r = pb::InfoRequest::decode(&bytes[..]).unwrap();
    assert_eq!(r.instance_snapshot_pairs[0].snapshot_name.as_deref(), Some("s"));
    assert_eq!((r.verbosity_level, r.no_runtime_information), (1, true));
}
