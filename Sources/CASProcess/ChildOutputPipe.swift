import CLinux
import Foundation

/// A pipe that this process reads and a child writes. Both ends are
/// close-on-exec and above the standard descriptors, so that the write end
/// can be placed at any descriptor of the child.
public final class ChildOutputPipe {
    public private(set) var readEnd: Int32
    public private(set) var writeEnd: Int32

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public init() throws {
        var fds: [Int32] = [-1, -1]
        guard casfs_pipe_cloexec(&fds) == 0 else {
            throw Failure(description: "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        readEnd = Self.moveAbove(fds[0], 9)
        writeEnd = Self.moveAbove(fds[1], 9)
    }

    deinit {
        if readEnd >= 0 { close(readEnd) }
        closeWriteEnd()
    }

    /// Once the child has it: from then on, end of file means the child is done.
    public func closeWriteEnd() {
        if writeEnd >= 0 { close(writeEnd) }
        writeEnd = -1
    }

    /// Everything written until end of file, or until nothing more is there
    /// if `untilEndOfFile` is false; then the read end is closed. At most
    /// `limit` bytes are kept (the rest is read and dropped).
    public func readAll(untilEndOfFile: Bool = true, limit: Int = 1 << 20) -> Data {
        var data = Data()
        if !untilEndOfFile {
            _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK)
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(readEnd, &buffer, buffer.count)
            if n > 0 {
                if data.count < limit { data.append(contentsOf: buffer[0..<min(n, limit - data.count)]) }
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(readEnd)
        readEnd = -1
        return data
    }

    /// `fd` duplicated to the lowest free descriptor above `floor`, close-on-exec, and `fd` closed.
    private static func moveAbove(_ fd: Int32, _ floor: Int32) -> Int32 {
        let moved = fcntl(fd, F_DUPFD_CLOEXEC, floor + 1)
        guard moved >= 0 else { return fd }
        close(fd)
        return moved
    }
}
