// Public API of node-nbd-server for programs that embed the server.
export { NbdServer, type ServerOptions, type ExportInfo, type ListenAddress, type ServerEvent } from './server';
export { NbdError, EXIT_CODES, type ErrorCode } from './errors';
export { parseSize, formatSize } from './size';
export { createLogger, type Logger } from './logger';
export { prepareImage, exportNameFor, type ImageSpec, type PreparedImage } from './image';
export { serve, type ServeOptions, type Serving } from './serve';
