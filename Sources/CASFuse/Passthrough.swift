import CASCore
import Foundation
import FuseKernel
import Synchronization

/// FUSE passthrough: a verified local blob file is registered with the
/// kernel (a backing id) and its opens are answered with that id, so the
/// kernel reads the file itself. The kernel allows one backing file per
/// inode and no mixing: while an inode has passthrough opens every new open
/// must join them (a writer joins with direct I/O, which overrides
/// passthrough for its own reads and writes), and while it has opens served
/// through the page cache, none may be passthrough. The id is released when
/// the last open of the inode is released.
final class PassthroughFiles: Sendable {
    enum Mode: Sendable, Equatable {
        case passthrough(Int32)
        /// Served by the daemon through the page cache.
        case cached
        /// A writer (direct I/O) on an inode without passthrough opens: no mode.
        case none
    }

    private struct Inode {
        var backing: (id: Int32, opens: Int)?
        var cachedOpens = 0
    }

    private struct State {
        var channel: FuseChannel?
        var on = false
        var inodes: [UInt64: Inode] = [:]
        var warned = false
    }

    /// Asked for at INIT.
    let wanted: Bool
    private let state = Mutex(State())
    private let opens: MetricCounter

    init(enabled: Bool, opens: MetricCounter) {
        wanted = enabled
        self.opens = opens
    }

    func connect(_ channel: FuseChannel, agreed: Bool) {
        state.withLock { s in
            s.channel = channel
            s.on = wanted && agreed
        }
    }

    var isOn: Bool { state.withLock { $0.on } }

    /// The mode of a new read-only open of `ino` whose bytes are `source`.
    func openReader(_ ino: UInt64, _ source: BlobSource) -> Mode {
        let (mode, warning) = state.withLock { s -> (Mode, String?) in
            var node = s.inodes[ino] ?? Inode()
            defer { s.inodes[ino] = node }
            if let b = node.backing {
                node.backing = (b.id, b.opens + 1)
                return (.passthrough(b.id), nil)
            }
            guard s.on, node.cachedOpens == 0, source.isVerified, let fd = source.fileDescriptor, let channel = s.channel else {
                node.cachedOpens += 1
                return (.cached, nil)
            }
            switch channel.openBacking(fd) {
            case .success(let id):
                node.backing = (id, 1)
                return (.passthrough(id), nil)
            case .failure(let e):
                node.cachedOpens += 1
                if e.code == EPERM {
                    // Not allowed for this daemon (no CAP_SYS_ADMIN): stop trying.
                    s.on = false
                    return (.cached, "passthrough is not allowed for this daemon (\(e)); reads are served by the daemon")
                }
                defer { s.warned = true }
                return (.cached, s.warned ? nil : "passthrough of a blob file failed (\(e)); served by the daemon")
            }
        }
        if let warning { log.warning("\(warning)") }
        if case .passthrough = mode { opens.add() }
        return mode
    }

    /// A read-only open served through the page cache; joins passthrough
    /// opens if the inode has any (the kernel allows no mixing).
    func openCached(_ ino: UInt64) -> Mode {
        state.withLock { s in
            var node = s.inodes[ino] ?? Inode()
            defer { s.inodes[ino] = node }
            if let b = node.backing {
                node.backing = (b.id, b.opens + 1)
                return .passthrough(b.id)
            }
            node.cachedOpens += 1
            return .cached
        }
    }

    /// The mode of a write open of `ino`: joins passthrough opens if any.
    /// Nil when it would join them but can also read: the kernel opens the
    /// inode's backing file (the stored object) again with the open's own
    /// flags and the daemon's credentials, and sends mmap there even for a
    /// direct-I/O open, so a read-write open could map the stored object
    /// shared and writable. Write-only opens cannot map.
    func openWriter(_ ino: UInt64, readable: Bool) -> Mode? {
        state.withLock { s in
            guard var node = s.inodes[ino], let b = node.backing else { return Mode.none }
            if readable { return nil }
            node.backing = (b.id, b.opens + 1)
            s.inodes[ino] = node
            return .passthrough(b.id)
        }
    }

    func release(_ ino: UInt64, _ mode: Mode) {
        let close = state.withLock { s -> (FuseChannel, Int32)? in
            guard var node = s.inodes[ino] else { return nil }
            var closed: (FuseChannel, Int32)?
            switch mode {
            case .passthrough(let id):
                if let b = node.backing, b.id == id {
                    if b.opens <= 1 {
                        node.backing = nil
                        if let c = s.channel { closed = (c, id) }
                    } else {
                        node.backing = (id, b.opens - 1)
                    }
                }
            case .cached:
                node.cachedOpens = max(0, node.cachedOpens - 1)
            case .none:
                break
            }
            s.inodes[ino] = node.backing == nil && node.cachedOpens == 0 ? nil : node
            return closed
        }
        if let (channel, id) = close { channel.closeBacking(id) }
    }
}
