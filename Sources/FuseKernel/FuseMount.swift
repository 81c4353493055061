import CFuse
import CLinux
import Foundation
import Glibc

public enum FuseMountError: Error, CustomStringConvertible {
    case session(String)
    case mount(String, String)

    public var description: String {
        switch self {
        case .session(let m): return "could not create the FUSE session: \(m)"
        case .mount(let mp, let why): return "could not mount on \(mp): \(why)"
        }
    }
}

/// A mount made (and undone) by libfuse: `mount(2)` as root, `fusermount3`
/// otherwise. Only the device descriptor is used: requests are served by
/// `FuseSession`, not by libfuse.
public final class FuseMount: @unchecked Sendable {
    public let mountpoint: String
    private let session: OpaquePointer
    public let fd: Int32
    private var mounted = true

    /// Mounts on `mountpoint` (resolved to a real path first) with the kernel
    /// mount options `options` (`fsname=...,ro,...`). A failure names its cause
    /// (libfuse's and fusermount3's own messages are captured).
    public init(mountpoint: String, options: String) throws {
        try FuseMount.checkDevice()
        var argStrings = ["casfs", "-o", options]
        let argv = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: argStrings.count + 1)
        for (i, s) in argStrings.enumerated() { argv[i] = strdup(s) }
        argv[argStrings.count] = nil
        var args = fuse_args(argc: Int32(argStrings.count), argv: argv, allocated: 0)
        defer {
            fuse_opt_free_args(&args)
            for i in 0..<argStrings.count { free(argv[i]) }
            argv.deallocate()
            argStrings.removeAll()
        }
        var ops = fuse_lowlevel_ops()
        let (se, sessionText) = FuseMount.capturingStderr {
            casfs_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, nil)
        }
        guard let se else { throw FuseMountError.session(sessionText.isEmpty ? "bad mount options?" : sessionText) }
        let (rc, mountText) = FuseMount.capturingStderr { fuse_session_mount(se, mountpoint) }
        guard rc == 0 else {
            fuse_session_destroy(se)
            throw FuseMountError.mount(mountpoint, mountText.isEmpty ? "fuse_session_mount failed" : mountText)
        }
        self.session = se
        self.fd = fuse_session_fd(se)
        _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
        self.mountpoint = mountpoint
    }

    /// Unmounts (if still mounted) and frees the session. Call once the
    /// request loop has ended.
    public func close() {
        guard mounted else { return }
        mounted = false
        _ = FuseMount.capturingStderr { fuse_session_unmount(session); return 0 }
        fuse_session_destroy(session)
    }

    /// Detaches the mount so the request loop ends (after SIGTERM, say).
    public static func detach(_ mountpoint: String) {
        if geteuid() == 0 {
            if umount2(mountpoint, Int32(MNT_DETACH)) == 0 { return }
        }
        var pid: pid_t = 0
        let words: [String] = ["fusermount3", "-u", "-z", mountpoint]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        casfs_spawn_addclosefrom(&actions, 3)
        if posix_spawnp(&pid, "fusermount3", &actions, nil, argv, environ) == 0 {
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
    }

    /// /dev/fuse must be there (and openable as root; others go through fusermount3).
    static func checkDevice() throws {
        var st = stat()
        guard stat("/dev/fuse", &st) == 0 else {
            throw FuseMountError.mount("", "/dev/fuse is missing (load the fuse module, or give the container --device /dev/fuse)")
        }
        if geteuid() == 0 {
            let fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)
            guard fd >= 0 else {
                throw FuseMountError.mount("", "cannot open /dev/fuse: \(String(cString: strerror(errno)))")
            }
            Glibc.close(fd)
        }
    }

    /// Runs `body` with stderr going to a pipe; returns its result and what it printed.
    static func capturingStderr<T>(_ body: () -> T) -> (T, String) {
        var p: [Int32] = [0, 0]
        guard casfs_pipe_cloexec(&p) == 0 else { return (body(), "") }
        let saved = fcntl(2, F_DUPFD_CLOEXEC, 0)
        _ = fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK)
        dup2(p[1], 2)
        let result = body()
        dup2(saved, 2)
        Glibc.close(saved)
        Glibc.close(p[1])
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(p[0], &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        Glibc.close(p[0])
        let text = String(decoding: out, as: UTF8.self).split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }.joined(separator: "; ")
        return (result, text)
    }
}
