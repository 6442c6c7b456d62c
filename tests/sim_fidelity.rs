//! The simulator against what a live multipassd 1.16.3 showed (reference §0.3): one test per
//! fact the simulator models, named after it, driven through mpool's own client.

use mpool_multipass::proto::multipass::start_error;
use mpool_multipass::{Error, InstanceState, LaunchOptions, Names};
use mpool_sim::EventKind;
use mpool_testkit::{TestSim, wait_event};
use tonic::Code;

fn launch_opts(name: &str) -> LaunchOptions {
    LaunchOptions { name: name.into(), image: "24.04".into(), ..Default::default() }
}

fn daemon_message(e: &Error) -> String {
    match e {
        Error::Daemon { message, .. } => message.clone(),
        other => panic!("expected the daemon's refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn fact_log_lines_inside_replies_can_arrive_at_any_point() {
    // multipassd writes log lines into every call in flight, so a reply carrying only a log
    // line may come before, between or after the answer; the client keeps the answer.
    let ts = TestSim::start(|c| c.log_lines = true).await;
    let c = ts.client("ops").await;
    let mut ev = ts.sim.events();
    assert_eq!(c.launch(&launch_opts("vm")).await.unwrap(), "vm", "launch names the instance");
    let listed = c.list().await.unwrap();
    assert_eq!(listed.len(), 1, "a trailing log-only reply is not an empty list: {listed:?}");
    assert_eq!(listed[0].state, InstanceState::Running);
    // The simulator did write log lines before and after the list's answer.
    let mut seen = Vec::new();
    loop {
        let e = wait_event(&mut ev, |e| e.op == "list").await;
        let done = e.kind == EventKind::Done;
        seen.push(e.kind);
        if done {
            break;
        }
    }
    let replied = seen.iter().position(|k| *k == EventKind::Replied).expect("an answer");
    assert!(seen[..replied].contains(&EventKind::LogLine), "a log line before the answer: {seen:?}");
    assert!(seen[replied..].contains(&EventKind::LogLine), "a log line after the answer: {seen:?}");

    assert_eq!(c.version_text().await.unwrap(), "1.16.3");
    assert_eq!(c.ssh_info("vm").await.unwrap().username, "ubuntu");
    assert_eq!(c.info(&Names::one("vm")).await.unwrap()[0].name, "vm");
    assert!(c.daemon_info().await.unwrap().cpus > 0);
    c.stop(&Names::one("vm"), false).await.unwrap();
    assert_eq!(c.snapshot("vm", None, "").await.unwrap(), "snapshot1");
    // A prompt (non-destructive restore) is answered, never a log line.
    c.restore("vm", "snapshot1", false).await.unwrap();
    assert_eq!(c.list_snapshots().await.unwrap().len(), 2, "the safety snapshot was taken");
    assert_eq!(c.delete(&Names::one("vm"), true).await.unwrap(), vec!["vm".to_string()]);
}

#[tokio::test]
async fn fact_info_without_runtime_information_leaves_runtime_fields_empty() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    let mut o = launch_opts("vm");
    o.cpus = 2;
    o.memory = "2G".into();
    o.disk = "8G".into();
    c.launch(&o).await.unwrap();
    std::fs::write(ts.root("vm").join("payload"), vec![7u8; 1 << 20]).unwrap();

    let cheap = c.info(&Names::one("vm")).await.unwrap().remove(0);
    assert_eq!(cheap.state, InstanceState::Running);
    for (field, value) in [
        ("cpu_count", &cheap.cpus),
        ("memory_total", &cheap.memory),
        ("disk_total", &cheap.disk),
        ("memory_usage", &cheap.memory_usage),
        ("disk_usage", &cheap.disk_usage),
        ("load", &cheap.load),
    ] {
        assert!(value.is_empty(), "{field} is gathered in the guest: empty without runtime information, got {value:?}");
    }
    assert!(cheap.ipv4.is_empty(), "{:?}", cheap.ipv4);

    let full = c.info_with_runtime(&Names::one("vm")).await.unwrap().remove(0);
    assert_eq!(full.cpus, "2");
    assert_eq!(full.memory, (2u64 << 30).to_string(), "memory as configured");
    assert_eq!(full.disk, (8u64 << 30).to_string());
    let used: u64 = full.disk_usage.parse().unwrap();
    assert!(used >= 1 << 20, "disk usage is the instance directory's size: {used}");
    assert!(!full.load.is_empty() && !full.memory_usage.is_empty());
    assert_eq!(full.ipv4, vec!["127.0.0.1".to_string()]);

    // A stopped instance has nothing to report even when asked.
    c.stop(&Names::one("vm"), false).await.unwrap();
    let stopped = c.info_with_runtime(&Names::one("vm")).await.unwrap().remove(0);
    assert!(stopped.cpus.is_empty() && stopped.ipv4.is_empty() && stopped.load.is_empty(), "{stopped:?}");
}

#[tokio::test]
async fn fact_list_without_request_ipv4_returns_no_addresses() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm")).await.unwrap();
    let cheap = c.list().await.unwrap();
    assert!(cheap[0].ipv4.is_empty(), "{cheap:?}");
    let full = c.list_with_ipv4().await.unwrap();
    assert_eq!(full[0].ipv4, vec!["127.0.0.1".to_string()]);
}

#[tokio::test]
async fn fact_get_local_passphrase_returns_the_stored_hash() {
    let ts = TestSim::start(|c| c.passphrase = Some("s3cret".into())).await;
    let c = ts.client("ops").await;
    let hash = c.get("local.passphrase").await.unwrap();
    assert_eq!(hash.len(), 128, "{hash:?}");
    assert!(hash.chars().all(|ch| ch.is_ascii_hexdigit()), "{hash:?}");
    assert_ne!(hash, "true");
    let unset = TestSim::start(|_| {}).await;
    assert_eq!(unset.client("ops").await.get("local.passphrase").await.unwrap(), "");
}

#[tokio::test]
async fn fact_restart_of_a_stopped_instance_is_an_unknown_state_error() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm1")).await.unwrap();
    c.stop(&Names::one("vm1"), false).await.unwrap();
    let err = c.restart(&Names::one("vm1"), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(
        daemon_message(&err),
        "Instance 'vm1' is already running, but in an unknown state.\nTry to stop and start it instead."
    );
}

#[tokio::test]
async fn fact_unknown_instances_info_and_stop_are_not_found_start_is_aborted_with_start_error() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    for err in
        [c.info(&Names::one("nosuch")).await.unwrap_err(), c.stop(&Names::one("nosuch"), false).await.unwrap_err()]
    {
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert_eq!(daemon_message(&err), "The following errors occurred:\ninstance \"nosuch\" does not exist");
    }
    let err = c.start(&Names::one("nosuch"), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    match &err {
        Error::Daemon { start_error: Some(se), .. } => {
            assert_eq!(se.instance_errors["nosuch"], start_error::ErrorCode::DoesNotExist as i32)
        }
        other => panic!("expected a StartError detail, got {other:?}"),
    }
    // Several problems at once: one line each, the code of the last kind (missing).
    c.launch(&launch_opts("gone")).await.unwrap();
    c.delete(&Names::one("gone"), false).await.unwrap();
    let err = c.suspend(&Names::new(vec!["gone".into(), "nosuch".into()]).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(
        daemon_message(&err),
        "The following errors occurred:\ninstance \"gone\" is deleted\ninstance \"nosuch\" does not exist"
    );
}

#[tokio::test]
async fn fact_launch_errors_carry_the_real_messages() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    c.launch(&launch_opts("vm3")).await.unwrap();
    let err = c.launch(&launch_opts("vm3")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(daemon_message(&err), "instance \"vm3\" already exists");

    let mut missing = launch_opts("vm4");
    missing.image = "file:///nonexistent/tiny.img".into();
    let err = c.launch(&missing).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(daemon_message(&err), "Custom image `/nonexistent/tiny.img` does not exist.");

    // A file:// image that exists launches.
    let img = ts.dir.path().join("tiny.img");
    std::fs::write(&img, b"qcow2").unwrap();
    let mut local = launch_opts("vm5");
    local.image = format!("file://{}", img.display());
    c.launch(&local).await.expect("a local image launches");

    // No image server reachable.
    let offline = TestSim::start(|c| c.image_servers_reachable = false).await;
    let c = offline.client("ops").await;
    let err = c.launch(&launch_opts("vm6")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(daemon_message(&err), "Remote \"\" is unknown or unreachable.");
    let mut default_image = launch_opts("vm6");
    default_image.image = String::new();
    assert_eq!(daemon_message(&c.launch(&default_image).await.unwrap_err()), "Remote \"\" is unknown or unreachable.");
}

#[tokio::test]
async fn images_as_multipass_takes_them() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    for (name, image, release) in [
        ("a", "release:24.04", "24.04 LTS"),
        ("b", "daily:noble", "24.04 LTS"),
        ("c", "jammy", "22.04 LTS"),
        ("d", "lts", "24.04 LTS"),
        ("e", "docker", "24.04 LTS"),
        ("f", "daily:devel", "25.10"),
    ] {
        let mut o = launch_opts(name);
        o.image = image.into();
        c.launch(&o).await.unwrap_or_else(|e| panic!("{image}: {e}"));
        let listed = c.list().await.unwrap();
        let row = listed.iter().find(|i| i.name == name).unwrap();
        assert_eq!(row.release, release, "{image}");
    }
    for (image, message) in [
        ("nosuch:noble", "Remote 'nosuch' is not found. Please use `multipass find` for supported remotes and images."),
        ("release:devel", "Unable to find an image matching \"devel\" in remote \"release\"."),
        (
            "https://example.invalid/x.img",
            "failed to download from 'https://example.invalid/x.img': Host example.invalid not found",
        ),
    ] {
        let mut o = launch_opts("z");
        o.image = image.into();
        let err = c.launch(&o).await.unwrap_err();
        assert_eq!((err.code(), daemon_message(&err).as_str()), (Code::FailedPrecondition, message), "{image}");
    }
    let mut o = launch_opts("z");
    o.image = "a:b:c".into();
    let err = c.launch(&o).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "refused before anything is sent: {err}");
    assert!(c.list().await.unwrap().iter().all(|i| i.name != "z"));
}

#[tokio::test]
async fn fact_instance_sizes_change_only_when_stopped_the_disk_only_grows_and_restore_brings_them_back() {
    let ts = TestSim::start(|_| {}).await;
    let c = ts.client("ops").await;
    let opts = LaunchOptions { cpus: 1, memory: "1G".into(), disk: "5G".into(), ..launch_opts("vm") };
    c.launch(&opts).await.unwrap();
    // Running: refused, as multipassd refuses.
    let err = c.set("local.vm.cpus", "2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert_eq!(
        daemon_message(&err),
        "Cannot update instance settings; instance: vm; reason: Instance must be stopped for modification"
    );
    c.suspend(&Names::one("vm")).await.unwrap();
    assert_eq!(c.set("local.vm.memory", "2G").await.unwrap_err().code(), Code::FailedPrecondition, "suspended");

    c.stop(&Names::one("vm"), true).await.unwrap();
    c.snapshot("vm", Some("clean"), "").await.unwrap();
    c.set("local.vm.cpus", "3").await.unwrap();
    c.set("local.vm.memory", "2G").await.unwrap();
    c.set("local.vm.disk", "8G").await.unwrap();
    // The daemon did not restart for these keys: the same connection still answers.
    assert_eq!(c.version_text().await.unwrap(), "1.16.3");
    assert!(ts.sim.daemon().exit_reason().is_none(), "no exit for a per-instance setting");
    assert_eq!(c.get("local.vm.cpus").await.unwrap(), "3");
    assert_eq!(c.get("local.vm.memory").await.unwrap(), "2.00GiB");
    assert_eq!(c.get("local.vm.disk").await.unwrap(), "8.00GiB");

    // The disk only grows; bad values are refused with multipassd's words.
    let err = c.set("local.vm.disk", "6G").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(daemon_message(&err), "Invalid setting 'local.vm.disk=6G': Disk can only be expanded");
    let err = c.set("local.vm.cpus", "0").await.unwrap_err();
    assert_eq!(
        daemon_message(&err),
        "Invalid setting 'local.vm.cpus=0': Need a positive integer (in decimal format) of minimum 1"
    );
    let err = c.set("local.vm.memory", "64M").await.unwrap_err();
    assert_eq!(
        daemon_message(&err),
        "Invalid setting 'local.vm.memory=64M': Memory less than 128M minimum not allowed"
    );
    let err = c.set("local.nope.cpus", "2").await.unwrap_err();
    assert_eq!(daemon_message(&err), "Cannot update instance settings; instance: nope; reason: No such instance");

    // Started, the guest has the new size.
    c.start(&Names::one("vm"), 0).await.unwrap();
    let info = c.info_with_runtime(&Names::one("vm")).await.unwrap();
    assert_eq!((info[0].cpus.as_str(), info[0].disk.as_str()), ("3", (8u64 << 30).to_string().as_str()));
    assert_eq!(info[0].memory, (2u64 << 30).to_string());

    // A restore brings back the snapshot's sizes: a resized VM needs its snapshot retaken.
    c.stop(&Names::one("vm"), true).await.unwrap();
    c.restore("vm", "clean", true).await.unwrap();
    assert_eq!(c.get("local.vm.cpus").await.unwrap(), "1");
    assert_eq!(c.get("local.vm.memory").await.unwrap(), "1.00GiB");
    assert_eq!(c.get("local.vm.disk").await.unwrap(), "5.00GiB");
}
