//! A program uploaded over SFTP runs as soon as its upload is closed, even when a VM's process
//! supervisor was forked (without exec) while the file was open for writing: by the time the
//! fork returns, the supervisor holds no copy of the file, so running it cannot fail with
//! ETXTBSY ("Text file busy").

use std::path::PathBuf;
use std::sync::Arc;

use mpool_core::types::SshEndpoint;
use mpool_sim::ssh::{SshKeys, SshServer};
use mpool_sim::vm_processes::VmSupervisor;
use mpool_ssh::{ConnectionCache, ExecRequest, SshOptions, TransferOptions};

/// The files process `pid` has open (what its descriptors point at).
fn open_files(pid: i32) -> Vec<PathBuf> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the supervisor's descriptors");
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_program_runs_although_a_supervisor_forked_while_it_was_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Arc::new(SshKeys::load_or_create(&dir.path().join("keys")).expect("keys"));
    let root = dir.path().join("vm");
    let server = SshServer::start(root.clone(), keys.clone(), 0).await.expect("ssh server");
    let target = SshEndpoint {
        host: "127.0.0.1".into(),
        port: server.port(),
        username: "ubuntu".into(),
        private_key: keys.client_key_text().into(),
    };
    let ssh = ConnectionCache::new(SshOptions::default());

    let mut upload =
        ssh.open_write("vm", &target, "bin/tool.sh", 0o755, &TransferOptions::default()).await.expect("open");
    upload.write(b"#!/bin/sh\necho \"tool ran with $1\"\n").await.expect("write");
    let root = std::fs::canonicalize(&root).expect("the VM's root");
    let tool = root.join("bin/tool.sh");
    assert!(tool.exists(), "the upload is open");

    // Another VM starts while the upload is open: its supervisor forks with the file open for
    // writing among the descriptors it inherits, and must have closed them all on return.
    let other = tokio::task::spawn_blocking(VmSupervisor::start).await.expect("join").expect("supervisor");
    let held = open_files(other.pid());
    assert!(!held.iter().any(|f| f == &tool), "the new supervisor still holds the upload open: {held:?}");
    assert!(!held.iter().any(|f| f.starts_with(&root)), "the new supervisor holds files of the VM: {held:?}");

    upload.finish().await.expect("close and chmod");
    let out = ssh.run("vm", &target, ExecRequest::shell("./bin/tool.sh arg")).await.expect("exec");
    assert!(out.success(), "running the uploaded program: {}", out.stderr_text());
    assert_eq!(out.stdout_text(), "tool ran with arg\n");

    other.shutdown().await;
    ssh.close_all().await;
    server.shutdown().await;
}
