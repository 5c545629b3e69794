//! Which syscall each handler program serves. The kernel side has two syscall
//! attachments (raw_syscalls `sys_enter` and `sys_exit`) that tail-call a handler by
//! syscall number; the handlers are named `sys_enter_<name>` and `sys_exit_<name>` after
//! the syscall, and this table gives the number (the architecture's ABI, from `libc`).

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the kernel programs read x86_64 syscall registers and numbers");

/// Which table a handler goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Enter,
    Exit,
}

/// The table slot of a handler program, from its name; `None` for any other program.
pub fn slot(program: &str) -> Option<(Side, &str)> {
    if let Some(name) = program.strip_prefix("sys_enter_") {
        Some((Side::Enter, name))
    } else {
        program.strip_prefix("sys_exit_").map(|name| (Side::Exit, name))
    }
}

/// The syscall number of `name` (as in `sys_enter_<name>`), for the syscalls handled.
pub fn number(name: &str) -> Option<u32> {
    let nr = match name {
        "read" => libc::SYS_read,
        "write" => libc::SYS_write,
        "readv" => libc::SYS_readv,
        "writev" => libc::SYS_writev,
        "recvfrom" => libc::SYS_recvfrom,
        "sendto" => libc::SYS_sendto,
        "recvmsg" => libc::SYS_recvmsg,
        "sendmsg" => libc::SYS_sendmsg,
        "recvmmsg" => libc::SYS_recvmmsg,
        "sendmmsg" => libc::SYS_sendmmsg,
        // The tracepoint and the handler say sendfile64; x86_64 has one sendfile.
        "sendfile64" => libc::SYS_sendfile,
        "socket" => libc::SYS_socket,
        "connect" => libc::SYS_connect,
        "accept" => libc::SYS_accept,
        "accept4" => libc::SYS_accept4,
        "close" => libc::SYS_close,
        "close_range" => libc::SYS_close_range,
        "dup" => libc::SYS_dup,
        "dup2" => libc::SYS_dup2,
        "dup3" => libc::SYS_dup3,
        "fcntl" => libc::SYS_fcntl,
        "mmap" => libc::SYS_mmap,
        _ => return None,
    };
    u32::try_from(nr).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_map_to_their_syscall_numbers() {
        assert_eq!(slot("sys_enter_read"), Some((Side::Enter, "read")));
        assert_eq!(slot("sys_exit_sendfile64"), Some((Side::Exit, "sendfile64")));
        assert_eq!(slot("sys_enter"), None);
        assert_eq!(slot("sched_process_fork"), None);
        assert_eq!(number("read"), Some(0));
        assert_eq!(number("sendfile64"), Some(40));
        assert_eq!(number("close_range"), Some(436));
        assert_eq!(number("clone"), None);
        for n in ["read", "sendmmsg", "accept4", "close_range", "dup3", "fcntl"] {
            assert!(number(n).unwrap() < observer_ebpf::SYSCALL_SLOTS, "{n}");
        }
    }
}
