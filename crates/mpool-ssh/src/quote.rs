//! POSIX shell quoting and the command line sent to the remote login shell.
//!
//! sshd hands the exec string to the user's login shell (`$SHELL -c STRING`), so everything
//! mpool sends is shell text. Every argv element is single-quoted, which makes every character
//! but `'` inert (`$`, `;`, backticks, globs, newlines, ...); an embedded `'` becomes `'\''`.

use super::error::SshError;

/// Linux refuses a single exec argument longer than 128 KiB (`MAX_ARG_STRLEN`), and the command
/// line is one argument of `sh -c`. Stay well below.
pub const MAX_COMMAND_LINE: usize = 120 * 1024;

/// Quotes one word for a POSIX shell: `'...'`, with each `'` written as `'\''`. The empty string
/// becomes `''`.
pub fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Quotes every element and joins them with spaces.
pub fn join(argv: &[String]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// Quotes a directory for `cd`, expanding a leading `~` or `~/` to `"$HOME"` (the only
/// expansion performed).
pub fn quote_dir(dir: &str) -> String {
    if dir == "~" {
        "\"$HOME\"".to_string()
    } else if let Some(rest) = dir.strip_prefix("~/") {
        format!("\"$HOME\"/{}", quote(rest))
    } else {
        quote(dir)
    }
}

/// True when `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Rejects strings a shell word cannot carry.
pub(crate) fn check_word(what: &str, word: &str) -> Result<(), SshError> {
    if word.contains('\0') {
        return Err(SshError::InvalidRequest(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// The pieces of a remote command line (everything already validated).
pub(crate) struct CommandLine<'a> {
    /// `cd` here first.
    pub cwd: Option<&'a str>,
    /// Exported before the command.
    pub env: &'a [(String, String)],
    /// The program and its arguments, `exec`ed so that the command keeps the shell's PID (and
    /// its exit status or signal reaches sshd unchanged).
    pub argv: &'a [String],
    /// When set, the shell first prints `mpool-exec-<id> <pid>` on stderr; the exec stream strips
    /// that line and uses the PID (= the process-group id, as sshd runs each session in its own
    /// session) to kill the whole command on cancel or timeout.
    pub marker_id: Option<&'a str>,
}

impl CommandLine<'_> {
    /// Builds the shell text: `[printf marker;] [cd -- DIR &&] [export K=V... &&] exec ARGV`.
    pub fn render(&self) -> Result<String, SshError> {
        let Some(program) = self.argv.first() else {
            return Err(SshError::InvalidRequest("empty argv".into()));
        };
        if program.is_empty() {
            return Err(SshError::InvalidRequest("empty program name".into()));
        }
        for arg in self.argv {
            check_word("argument", arg)?;
        }
        let mut line = String::new();
        if let Some(id) = self.marker_id {
            line.push_str(&format!("printf 'mpool-exec-%s %s\\n' {} \"$$\" >&2; ", quote(id)));
        }
        if let Some(dir) = self.cwd {
            check_word("working directory", dir)?;
            if dir.is_empty() {
                return Err(SshError::InvalidRequest("empty working directory".into()));
            }
            line.push_str(&format!("cd -- {} && ", quote_dir(dir)));
        }
        if !self.env.is_empty() {
            line.push_str("export");
            for (name, value) in self.env {
                if !is_valid_env_name(name) {
                    return Err(SshError::InvalidRequest(format!(
                        "environment variable name {name:?} is not [A-Za-z_][A-Za-z0-9_]*"
                    )));
                }
                check_word("environment value", value)?;
                line.push_str(&format!(" {name}={}", quote(value)));
            }
            line.push_str(" && ");
        }
        line.push_str("exec ");
        line.push_str(&join(self.argv));
        if line.len() > MAX_COMMAND_LINE {
            return Err(SshError::InvalidRequest(format!(
                "command line is {} bytes, over the {} byte limit; pass large data on stdin or \
                 as a script",
                line.len(),
                MAX_COMMAND_LINE
            )));
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quotes_single_quotes_and_empty() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("abc"), "'abc'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("$HOME; `x` *"), "'$HOME; `x` *'");
    }

    #[test]
    fn env_names() {
        assert!(is_valid_env_name("A"));
        assert!(is_valid_env_name("_x9"));
        assert!(!is_valid_env_name(""));
        assert!(!is_valid_env_name("9A"));
        assert!(!is_valid_env_name("A-B"));
        assert!(!is_valid_env_name("A=B"));
        assert!(!is_valid_env_name("A B"));
    }

    #[test]
    fn dirs_expand_only_home() {
        assert_eq!(quote_dir("~"), "\"$HOME\"");
        assert_eq!(quote_dir("~/a b"), "\"$HOME\"/'a b'");
        assert_eq!(quote_dir("/x/~y"), "'/x/~y'");
    }

    #[test]
    fn rejects_bad_input() {
        let env = vec![("BAD-NAME".to_string(), "v".to_string())];
        let argv = strings(&["true"]);
        let line = CommandLine { cwd: None, env: &env, argv: &argv, marker_id: None };
        assert!(matches!(line.render(), Err(SshError::InvalidRequest(_))));
        let argv = strings(&["echo", "a\0b"]);
        let line = CommandLine { cwd: None, env: &[], argv: &argv, marker_id: None };
        assert!(matches!(line.render(), Err(SshError::InvalidRequest(_))));
        let line = CommandLine { cwd: None, env: &[], argv: &[], marker_id: None };
        assert!(matches!(line.render(), Err(SshError::InvalidRequest(_))));
        let argv = vec!["x".repeat(MAX_COMMAND_LINE)];
        let line = CommandLine { cwd: None, env: &[], argv: &argv, marker_id: None };
        assert!(matches!(line.render(), Err(SshError::InvalidRequest(_))));
    }

    /// Runs the rendered line through real shells (dash and bash) and checks every argument
    /// arrives byte for byte.
    #[test]
    fn hostile_arguments_survive_real_shells() {
        let args = [
            "",
            "a b",
            "it's",
            "\"double\"",
            "$HOME",
            "; touch /tmp/mpool-quote-pwned",
            "&& false",
            "`id`",
            "$(id)",
            "line1\nline2",
            "*",
            "~",
            "\\",
            "'",
            "''",
            "-n",
            "tab\there",
            "ünïcødé",
        ];
        let mut argv = strings(&["printf", "[%s]\\n"]);
        argv.extend(strings(&args));
        let env = vec![("MPOOL_Q".to_string(), "v'a$l".to_string())];
        let line = CommandLine { cwd: Some("/"), env: &env, argv: &argv, marker_id: None }.render().unwrap();
        let expected: String = args.iter().map(|a| format!("[{a}]\n")).collect();
        for shell in ["sh", "bash", "dash"] {
            let Ok(out) = Command::new(shell).arg("-c").arg(&line).output() else {
                continue; // shell not installed
            };
            assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{shell}");
            let env_line = CommandLine {
                cwd: Some("/"),
                env: &env,
                argv: &strings(&["sh", "-c", "printf %s \"$MPOOL_Q\"; pwd"]),
                marker_id: None,
            }
            .render()
            .unwrap();
            let out = Command::new(shell).arg("-c").arg(&env_line).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "v'a$l/\n", "{shell}");
        }
        assert!(!std::path::Path::new("/tmp/mpool-quote-pwned").exists());
    }

    #[test]
    fn marker_reports_the_exec_pid() {
        let argv = strings(&["sh", "-c", "echo $$"]);
        let line = CommandLine { cwd: None, env: &[], argv: &argv, marker_id: Some("t1") }.render().unwrap();
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(stderr, format!("mpool-exec-t1 {stdout}\n"));
    }
}
