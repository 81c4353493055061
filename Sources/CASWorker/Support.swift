import CASCore
import Foundation
import Logging
import REAPI
import SwiftProtobuf

let log = Logger(label: "casfs.worker")

typealias REDigest = Build_Bazel_Remote_Execution_V2_Digest
public typealias REAction = Build_Bazel_Remote_Execution_V2_Action
public typealias RECommand = Build_Bazel_Remote_Execution_V2_Command
public typealias REActionResult = Build_Bazel_Remote_Execution_V2_ActionResult
typealias RETree = Build_Bazel_Remote_Execution_V2_Tree
typealias REDirectory = Build_Bazel_Remote_Execution_V2_Directory
public typealias BotSession = Google_Devtools_Remoteworkers_V1test2_BotSession
public typealias Lease = Google_Devtools_Remoteworkers_V1test2_Lease
public typealias RPCStatus = Google_Rpc_Status

extension REDigest {
    init(_ d: Digest) {
        self.init()
        hash = d.hash
        sizeBytes = d.size
    }

    /// The digest, checked (64 lowercase hex digits, a size from 0 up).
    func checked(_ what: String) throws(WorkerFailure) -> Digest {
        do { return try Digest(hash: hash, size: sizeBytes) } catch {
            throw WorkerFailure(.invalidArgument, "\(what) is not a valid digest (\(hash)/\(sizeBytes))")
        }
    }
}

/// gRPC status codes the worker sets on a lease (google.rpc.Code).
public enum StatusCode: Int32, Sendable {
    case ok = 0
    case cancelled = 1
    case unknown = 2
    case invalidArgument = 3
    case deadlineExceeded = 4
    case notFound = 5
    case failedPrecondition = 9
    case aborted = 10
    case internalError = 13
    case unavailable = 14
}

/// A failure on the worker's side (not the command's): it becomes the
/// lease's status, with a message that names the cause.
public struct WorkerFailure: Error, CustomStringConvertible, Sendable {
    public let code: StatusCode
    public let message: String

    public init(_ code: StatusCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    var status: RPCStatus {
        var s = RPCStatus()
        s.code = code.rawValue
        s.message = message
        return s
    }
}

extension Date {
    var timestamp: Google_Protobuf_Timestamp { Google_Protobuf_Timestamp(date: self) }
}

/// strerror as a Swift string.
func errnoText(_ code: Int32 = errno) -> String { String(cString: strerror(code)) }
