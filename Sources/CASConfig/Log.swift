import Logging

let log = Logger(label: "casfs.config")
