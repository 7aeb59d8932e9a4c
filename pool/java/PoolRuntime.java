import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.EOFException;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.UncheckedIOException;
import java.lang.ref.WeakReference;
import java.nio.BufferUnderflowException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Random;
import java.util.SplittableRandom;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.ThreadLocalRandom;

/**
 * prewarm-pool Java SDK: lets an app be checkpointed by the pool once booted and
 * learn, in each restored copy, who it is.
 *
 * <pre>
 *   Random rnd = PoolRuntime.registerRandom(new Random());
 *   ... boot, warm up, open listening sockets ...
 *   PoolRuntime.Identity id = PoolRuntime.checkpoint(args);   // returns once per restored copy
 *   String greeting = PoolRuntime.getenv("GREETING");
 * </pre>
 *
 * The pool starts the app with {@code POOL_CONTROL_FDS="R,W"} (inherited pipe ends).
 * Messages are framed as a 4-byte big-endian length followed by a msgpack map.
 * Without that variable {@link #checkpoint()} runs the hooks in place and returns a
 * "local" identity, so the app also runs normally outside the pool.
 *
 * After the identity the SDK keeps the channel and serves it in a daemon thread:
 * each checkpoint of the running copy ({@code pool checkpoint}, suspend, migrate) runs
 * the {@link #beforeCheckpoint} hooks before the freeze and the {@link #afterCheckpoint}
 * ones after it.
 *
 * Only registered {@link Random}s are reseeded: ThreadLocalRandom, Math.random() and
 * other generators seeded before the checkpoint are identical in every copy.
 *
 * Dependency-free and package-less so a template can compile it next to its own code.
 */
public final class PoolRuntime {

    /** Instance id reported when not running under the pool. */
    public static final String LOCAL_INSTANCE_ID = "local";

    private static final int MAX_FRAME = 64 << 20;
    private static final long SEED_STEP = 0x9E3779B97F4A7C15L;

    private static final List<WeakReference<Random>> randoms = new CopyOnWriteArrayList<>();
    private static final List<Runnable> beforeHooks = new CopyOnWriteArrayList<>();
    private static final List<Runnable> afterHooks = new CopyOnWriteArrayList<>();
    private static final List<Runnable> afterCheckpointHooks = new CopyOnWriteArrayList<>();
    private static final Object checkpointLock = new Object();

    private static volatile Identity identity;
    private static InputStream controlIn;
    private static OutputStream controlOut;

    private PoolRuntime() {}

    /** Who this copy is. {@code deadline} is unix time (0 when not under the pool). */
    public record Identity(String instanceId, Map<String, String> env, List<String> args,
                           String hostname, long seed, double deadline) {
        public Identity {
            Objects.requireNonNull(instanceId, "instanceId");
            env = Collections.unmodifiableMap(new LinkedHashMap<>(env));
            args = List.copyOf(args);
        }
    }

    // ---------------------------------------------------------------- public API

    /** Reseed {@code r} in every restored copy (a different seed per registered Random). */
    public static <R extends Random> R registerRandom(R r) {
        Objects.requireNonNull(r, "random");
        if (r instanceof ThreadLocalRandom) {
            throw new IllegalArgumentException("ThreadLocalRandom cannot be reseeded");
        }
        randoms.add(new WeakReference<>(r));
        return r;
    }

    /**
     * Run just before the checkpoint (close connections, flush caches, ...): the template's,
     * and each {@code pool checkpoint} (suspend, migrate) of a running copy. Hooks run in
     * reverse registration order (as CRaC does).
     */
    public static void beforeCheckpoint(Runnable hook) {
        beforeHooks.add(Objects.requireNonNull(hook, "hook"));
    }

    /**
     * Run once a running copy's checkpoint is taken, in the copy that kept running and in
     * each process restored from that snapshot (rollback, resume, restart, migrate); in
     * registration order, on the SDK's control thread.
     */
    public static void afterCheckpoint(Runnable hook) {
        afterCheckpointHooks.add(Objects.requireNonNull(hook, "hook"));
    }

    /** Run in each restored copy, after reseeding, in registration order. */
    public static void afterRestore(Runnable hook) {
        afterHooks.add(Objects.requireNonNull(hook, "hook"));
    }

    /** The identity env override if set, else the process environment. */
    public static String getenv(String name) {
        Identity id = identity;
        if (id != null && id.env().containsKey(name)) {
            return id.env().get(name);
        }
        return System.getenv(name);
    }

    /** This copy's identity, or null before {@link #checkpoint()} returned. */
    public static Identity identity() {
        return identity;
    }

    /** Like {@link #checkpoint(String[])}, taking the app's args from the command line. */
    public static Identity checkpoint() {
        return checkpoint(null);
    }

    /**
     * Hand the booted process to the pool to be checkpointed; returns in every restored
     * copy with that copy's identity. {@code ownArgs} (the app's main args) are only
     * used when not under the pool. Later calls return the same identity.
     *
     * @throws RuntimeException if a hook fails or the control channel breaks
     */
    public static Identity checkpoint(String[] ownArgs) {
        synchronized (checkpointLock) {
            if (identity != null) {
                return identity;
            }
            String fds = System.getenv("POOL_CONTROL_FDS");
            if (fds == null || fds.isBlank()) {
                runHooks(reversed(beforeHooks), "before-checkpoint");
                identity = new Identity(LOCAL_INSTANCE_ID, Map.of(),
                        ownArgs != null ? Arrays.asList(ownArgs) : commandLineArgs(), null, 0L, 0.0);
                runHooks(afterHooks, "after-restore");
                return identity;
            }
            try {
                return checkpointUnderPool(fds);
            } catch (IOException e) {
                sendError("control channel: " + e.getMessage());
                throw new UncheckedIOException("pool control channel: " + e.getMessage(), e);
            } catch (RuntimeException e) {
                sendError(e.getMessage());
                throw e;
            }
        }
    }

    // ---------------------------------------------------------------- checkpoint flow

    private static Identity checkpointUnderPool(String fds) throws IOException {
        openChannel(fds);
        runHooks(reversed(beforeHooks), "before-checkpoint");

        long pid = ProcessHandle.current().pid();
        writeFrame(controlOut, message("type", "ready", "pid", pid, "runtime", "java"));

        // CRIU dumps the process while it is blocked here; each copy resumes the read.
        Map<?, ?> msg = asMap(readFrame(controlIn), "message");
        Object type = msg.get("type");
        if (!"identity".equals(type)) {
            throw new IllegalStateException("unexpected control message type: " + type);
        }
        Identity id = parseIdentity(msg);
        identity = id; // hooks may already use getenv()
        reseedRandoms(id.seed());
        runHooks(afterHooks, "after-restore");

        writeFrame(controlOut, message("type", "ack", "instance_id", id.instanceId(), "pid",
                ProcessHandle.current().pid(), "serves", List.of("checkpoint")));
        Thread control = new Thread(PoolRuntime::serveCheckpoints, "pool-control");
        control.setDaemon(true); // blocked in a read of the channel: must not keep the JVM up
        control.start();
        return id;
    }

    /**
     * A running copy's side of its control channel: run the checkpoint hooks when told.
     * Ends when the pool closes the channel (or it breaks).
     */
    private static void serveCheckpoints() {
        while (true) {
            Map<String, Object> reply;
            try {
                reply = runCheckpointHooks(asMap(readFrame(controlIn), "message").get("type"));
            } catch (IOException e) {
                return;
            }
            try {
                writeFrame(controlOut, reply);
            } catch (IOException e) {
                return;
            }
        }
    }

    /** The reply to one control message: ok, or the error the pool reports. */
    private static Map<String, Object> runCheckpointHooks(Object type) {
        try {
            if ("before_checkpoint".equals(type)) {
                runHooks(reversed(beforeHooks), "before-checkpoint");
            } else if ("after_checkpoint".equals(type)) {
                runHooks(afterCheckpointHooks, "after-checkpoint");
            } else {
                return message("type", "error", "message", "unknown control message '" + type + "'");
            }
        } catch (RuntimeException e) {
            return message("type", "error", "message", e.getMessage());
        }
        return message("type", "ok");
    }

    private static void openChannel(String fds) throws IOException {
        if (controlIn != null) {
            return;
        }
        String[] parts = fds.split(",");
        if (parts.length != 2) {
            throw new IOException("POOL_CONTROL_FDS must be \"R,W\", got \"" + fds + "\"");
        }
        int r, w;
        try {
            r = Integer.parseInt(parts[0].trim());
            w = Integer.parseInt(parts[1].trim());
        } catch (NumberFormatException e) {
            throw new IOException("POOL_CONTROL_FDS must be \"R,W\", got \"" + fds + "\"");
        }
        // Java cannot adopt raw fds; reopening the pipes through /proc gives the same pipes.
        controlIn = new FileInputStream("/proc/self/fd/" + r);
        controlOut = new FileOutputStream("/proc/self/fd/" + w);
    }

    private static void runHooks(List<Runnable> hooks, String phase) {
        for (Runnable hook : hooks) {
            try {
                hook.run();
            } catch (Throwable t) {
                throw new RuntimeException(phase + " hook failed: " + t, t);
            }
        }
    }

    private static void reseedRandoms(long seed) {
        int index = 0;
        for (WeakReference<Random> ref : randoms) {
            // Index counts collected entries too, so each Random keeps its own seed stream.
            long derived = new SplittableRandom(seed ^ (index++ * SEED_STEP)).nextLong();
            Random r = ref.get();
            if (r != null) {
                r.setSeed(derived);
            }
        }
    }

    /** Best effort: tell the pool why this copy is failing. */
    private static void sendError(String text) {
        if (controlOut == null) {
            return;
        }
        try {
            writeFrame(controlOut, message("type", "error", "message", String.valueOf(text)));
        } catch (IOException | RuntimeException ignored) {
            // the pool is gone or the channel is broken; the caller throws anyway
        }
    }

    private static Identity parseIdentity(Map<?, ?> m) throws IOException {
        Object id = m.get("instance_id");
        if (!(id instanceof String)) {
            throw new IOException("identity: instance_id must be a string");
        }
        Map<String, String> env = new LinkedHashMap<>();
        if (m.get("env") != null) {
            for (Map.Entry<?, ?> e : asMap(m.get("env"), "identity env").entrySet()) {
                if (!(e.getKey() instanceof String k) || !(e.getValue() instanceof String v)) {
                    throw new IOException("identity: env must map strings to strings");
                }
                env.put(k, v);
            }
        }
        List<String> args = new ArrayList<>();
        if (m.get("args") != null) {
            if (!(m.get("args") instanceof List<?> list)) {
                throw new IOException("identity: args must be a list");
            }
            for (Object a : list) {
                if (!(a instanceof String s)) {
                    throw new IOException("identity: args must be strings");
                }
                args.add(s);
            }
        }
        Object host = m.get("hostname");
        if (host != null && !(host instanceof String)) {
            throw new IOException("identity: hostname must be a string or nil");
        }
        return new Identity((String) id, env, args, (String) host,
                number(m.get("seed"), "seed").longValue(),
                number(m.get("deadline"), "deadline").doubleValue());
    }

    private static Number number(Object v, String field) throws IOException {
        if (v == null) {
            return 0L;
        }
        if (!(v instanceof Number n)) {
            throw new IOException("identity: " + field + " must be a number");
        }
        return n;
    }

    private static Map<?, ?> asMap(Object v, String what) throws IOException {
        if (!(v instanceof Map<?, ?> m)) {
            throw new IOException(what + " must be a map");
        }
        return m;
    }

    private static Map<String, Object> message(Object... kv) {
        Map<String, Object> m = new LinkedHashMap<>();
        for (int i = 0; i < kv.length; i += 2) {
            m.put((String) kv[i], kv[i + 1]);
        }
        return m;
    }

    private static <T> List<T> reversed(List<T> list) {
        List<T> copy = new ArrayList<>(list);
        Collections.reverse(copy);
        return copy;
    }

    /** The app's main args, recovered exactly from /proc/self/cmdline when possible. */
    private static List<String> commandLineArgs() {
        String command = System.getProperty("sun.java.command", "");
        if (command.isBlank()) {
            return List.of();
        }
        String main = command.split(" ", 2)[0];
        List<String> all = procCmdline();
        for (int i = 0; i < all.size(); i++) {
            if (all.get(i).equals(main)) {
                List<String> rest = all.subList(i + 1, all.size());
                String rebuilt = rest.isEmpty() ? main : main + " " + String.join(" ", rest);
                if (rebuilt.equals(command)) {
                    return rest;
                }
            }
        }
        String[] words = command.trim().split("\\s+");
        return Arrays.asList(words).subList(1, words.length);
    }

    /** NUL-separated argv (ProcessHandle.Info drops empty arguments). */
    private static List<String> procCmdline() {
        List<String> argv = new ArrayList<>();
        try {
            byte[] raw = Files.readAllBytes(Path.of("/proc/self/cmdline"));
            int start = 0;
            for (int i = 0; i < raw.length; i++) {
                if (raw[i] == 0) {
                    argv.add(new String(raw, start, i - start, StandardCharsets.UTF_8));
                    start = i + 1;
                }
            }
        } catch (IOException e) {
            // not Linux: fall back to splitting sun.java.command
        }
        return argv;
    }

    // ---------------------------------------------------------------- framing + msgpack

    private static void writeFrame(OutputStream out, Object message) throws IOException {
        ByteArrayOutputStream body = new ByteArrayOutputStream();
        pack(new DataOutputStream(body), message);
        ByteBuffer frame = ByteBuffer.allocate(4 + body.size());
        frame.putInt(body.size()).put(body.toByteArray());
        out.write(frame.array());
        out.flush();
    }

    private static Object readFrame(InputStream in) throws IOException {
        byte[] header = new byte[4];
        if (readFully(in, header) == 0) {
            throw new EOFException("control channel closed");
        }
        long length = ByteBuffer.wrap(header).getInt() & 0xffffffffL;
        if (length > MAX_FRAME) {
            throw new IOException("frame too large: " + length + " bytes");
        }
        byte[] body = new byte[(int) length];
        readFully(in, body);
        ByteBuffer buf = ByteBuffer.wrap(body);
        try {
            Object value = unpack(buf);
            if (buf.hasRemaining()) {
                throw new IOException("trailing bytes after msgpack value");
            }
            return value;
        } catch (BufferUnderflowException e) {
            throw new IOException("truncated msgpack value");
        }
    }

    /**
     * Fill buf; returns 0 on EOF before the first byte. (Not readNBytes: JDK 17's
     * FileInputStream version seeks, which fails on pipes.)
     */
    private static int readFully(InputStream in, byte[] buf) throws IOException {
        int done = 0;
        while (done < buf.length) {
            int n = in.read(buf, done, buf.length - done);
            if (n < 0) {
                if (done == 0) {
                    return 0;
                }
                throw new EOFException("control channel closed mid-frame");
            }
            done += n;
        }
        return done;
    }

    private static void pack(DataOutputStream o, Object v) throws IOException {
        if (v == null) {
            o.write(0xc0);
        } else if (v instanceof Boolean b) {
            o.write(b ? 0xc3 : 0xc2);
        } else if (v instanceof Long || v instanceof Integer || v instanceof Short || v instanceof Byte) {
            packInt(o, ((Number) v).longValue());
        } else if (v instanceof Float f) {
            o.write(0xca);
            o.writeFloat(f);
        } else if (v instanceof Double d) {
            o.write(0xcb);
            o.writeDouble(d);
        } else if (v instanceof CharSequence s) {
            byte[] utf8 = s.toString().getBytes(StandardCharsets.UTF_8);
            packHeader(o, utf8.length, 0xa0, 32, 0xd9, 0xda, 0xdb);
            o.write(utf8);
        } else if (v instanceof byte[] bytes) {
            packHeader(o, bytes.length, -1, 0, 0xc4, 0xc5, 0xc6);
            o.write(bytes);
        } else if (v instanceof Map<?, ?> map) {
            packHeader(o, map.size(), 0x80, 16, -1, 0xde, 0xdf);
            for (Map.Entry<?, ?> e : map.entrySet()) {
                pack(o, e.getKey());
                pack(o, e.getValue());
            }
        } else if (v instanceof Collection<?> items) {
            packHeader(o, items.size(), 0x90, 16, -1, 0xdc, 0xdd);
            for (Object item : items) {
                pack(o, item);
            }
        } else if (v instanceof Object[] items) {
            pack(o, Arrays.asList(items));
        } else {
            throw new IOException("cannot msgpack-encode " + v.getClass().getName());
        }
    }

    private static void packInt(DataOutputStream o, long n) throws IOException {
        if (n >= 0) {
            if (n < 0x80) {
                o.write((int) n);
            } else if (n < 0x100) {
                o.write(0xcc);
                o.write((int) n);
            } else if (n < 0x10000) {
                o.write(0xcd);
                o.writeShort((int) n);
            } else if (n < 0x100000000L) {
                o.write(0xce);
                o.writeInt((int) n);
            } else {
                o.write(0xcf);
                o.writeLong(n);
            }
        } else if (n >= -32) {
            o.write((int) n); // negative fixint: the low byte
        } else if (n >= Byte.MIN_VALUE) {
            o.write(0xd0);
            o.write((int) n);
        } else if (n >= Short.MIN_VALUE) {
            o.write(0xd1);
            o.writeShort((int) n);
        } else if (n >= Integer.MIN_VALUE) {
            o.write(0xd2);
            o.writeInt((int) n);
        } else {
            o.write(0xd3);
            o.writeLong(n);
        }
    }

    /** Length header; a type byte of -1 means the format has no such variant. */
    private static void packHeader(DataOutputStream o, int n, int fix, int fixLimit,
                                   int t8, int t16, int t32) throws IOException {
        if (fix >= 0 && n < fixLimit) {
            o.write(fix | n);
        } else if (t8 >= 0 && n < 0x100) {
            o.write(t8);
            o.write(n);
        } else if (n < 0x10000) {
            o.write(t16);
            o.writeShort(n);
        } else {
            o.write(t32);
            o.writeInt(n);
        }
    }

    private static Object unpack(ByteBuffer b) throws IOException {
        int t = b.get() & 0xff;
        if (t <= 0x7f) {
            return (long) t;
        } else if (t >= 0xe0) {
            return (long) (byte) t;
        } else if (t <= 0x8f) {
            return unpackMap(b, t & 0x0f);
        } else if (t <= 0x9f) {
            return unpackArray(b, t & 0x0f);
        } else if (t <= 0xbf) {
            return new String(bytes(b, t & 0x1f), StandardCharsets.UTF_8);
        }
        return switch (t) {
            case 0xc0 -> null;
            case 0xc2 -> false;
            case 0xc3 -> true;
            case 0xc4 -> bytes(b, b.get() & 0xff);
            case 0xc5 -> bytes(b, b.getShort() & 0xffff);
            case 0xc6 -> bytes(b, length(b, b.getInt()));
            case 0xca -> (double) b.getFloat();
            case 0xcb -> b.getDouble();
            case 0xcc -> (long) (b.get() & 0xff);
            case 0xcd -> (long) (b.getShort() & 0xffff);
            case 0xce -> b.getInt() & 0xffffffffL;
            case 0xcf -> {
                long n = b.getLong();
                if (n < 0) {
                    throw new IOException("uint64 value does not fit in a long");
                }
                yield n;
            }
            case 0xd0 -> (long) b.get();
            case 0xd1 -> (long) b.getShort();
            case 0xd2 -> (long) b.getInt();
            case 0xd3 -> b.getLong();
            case 0xd9 -> new String(bytes(b, b.get() & 0xff), StandardCharsets.UTF_8);
            case 0xda -> new String(bytes(b, b.getShort() & 0xffff), StandardCharsets.UTF_8);
            case 0xdb -> new String(bytes(b, length(b, b.getInt())), StandardCharsets.UTF_8);
            case 0xdc -> unpackArray(b, b.getShort() & 0xffff);
            case 0xdd -> unpackArray(b, length(b, b.getInt()));
            case 0xde -> unpackMap(b, b.getShort() & 0xffff);
            case 0xdf -> unpackMap(b, length(b, b.getInt()));
            default -> throw new IOException(String.format("unsupported msgpack type byte 0x%02x", t));
        };
    }

    /** A 32-bit length; every element takes at least one byte, so it cannot exceed what is left. */
    private static int length(ByteBuffer b, int raw) throws IOException {
        long n = raw & 0xffffffffL;
        if (n > b.remaining()) {
            throw new IOException("truncated msgpack value");
        }
        return (int) n;
    }

    private static byte[] bytes(ByteBuffer b, int n) throws IOException {
        if (n > b.remaining()) {
            throw new IOException("truncated msgpack value");
        }
        byte[] out = new byte[n];
        b.get(out);
        return out;
    }

    private static List<Object> unpackArray(ByteBuffer b, int n) throws IOException {
        List<Object> items = new ArrayList<>(Math.min(n, b.remaining()));
        for (int i = 0; i < n; i++) {
            items.add(unpack(b));
        }
        return items;
    }

    private static Map<Object, Object> unpackMap(ByteBuffer b, int n) throws IOException {
        Map<Object, Object> map = new LinkedHashMap<>();
        for (int i = 0; i < n; i++) {
            Object key = unpack(b);
            map.put(key, unpack(b));
        }
        return map;
    }
}
