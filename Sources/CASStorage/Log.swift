import CASCore
import Logging

/// The storage stack's logger.
let log = Logger(label: "casfs.storage")
/// Failures a remote party can repeat at will (a failing fallback, a server
/// sending wrong bytes), folded by kind and blob.
let foldedLog = LogFolder(logger: log)
