//! SSH sessions to VMs: pooled connections, exec, SFTP.
