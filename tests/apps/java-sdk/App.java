import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicInteger;

/**
 * Test app for the Java SDK (tests/integration/test_java_sdk_restore.py): every restored copy answers
 * GET / with what it sees: identity, env, args, hostname, a registered Random and the hooks that ran
 * (tests/integration/test_live_sdk_hooks.py: checkpointHooks, the checkpoint hooks as they ran in this
 * process's history). With FAIL_CHECKPOINT_HOOK in its identity's env its before-checkpoint hook throws.
 */
public class App {

    private static final Random RANDOM = PoolRuntime.registerRandom(new Random(7));
    private static final AtomicInteger BEFORE = new AtomicInteger();
    private static final List<String> AFTER = new CopyOnWriteArrayList<>();
    private static final List<String> CHECKPOINT_HOOKS = new CopyOnWriteArrayList<>();

    public static void main(String[] args) throws Exception {
        PoolRuntime.beforeCheckpoint(BEFORE::incrementAndGet);
        PoolRuntime.afterRestore(() -> AFTER.add(PoolRuntime.identity().instanceId()));
        PoolRuntime.beforeCheckpoint(() -> {
            if (PoolRuntime.getenv("FAIL_CHECKPOINT_HOOK") != null) {
                throw new IllegalStateException("java-sdk refuses: FAIL_CHECKPOINT_HOOK is set");
            }
            CHECKPOINT_HOOKS.add("before");
        });
        PoolRuntime.afterCheckpoint(() -> CHECKPOINT_HOOKS.add("after"));

        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", 8080), 0);
        server.createContext("/", ex -> {
            try (ex) {
                PoolRuntime.Identity id = PoolRuntime.identity();
                String body = "{\"instance\": " + quote(id == null ? null : id.instanceId())
                        + ", \"greeting\": " + quote(PoolRuntime.getenv("GREETING"))
                        + ", \"args\": " + quoteAll(id == null ? List.of() : id.args())
                        + ", \"hostname\": " + quote(Files.readString(Path.of("/proc/sys/kernel/hostname")).trim())
                        + ", \"before\": " + BEFORE.get()
                        + ", \"after\": " + quoteAll(AFTER)
                        + ", \"checkpointHooks\": " + quoteAll(CHECKPOINT_HOOKS)
                        + ", \"random\": " + RANDOM.nextLong() + "}";
                byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
                ex.sendResponseHeaders(200, bytes.length);
                try (OutputStream out = ex.getResponseBody()) {
                    out.write(bytes);
                }
            }
        });
        server.start();
        PoolRuntime.checkpoint(args);
    }

    private static String quoteAll(List<String> items) {
        List<String> quoted = new ArrayList<>();
        for (String s : items) {
            quoted.add(quote(s));
        }
        return "[" + String.join(", ", quoted) + "]";
    }

    /** JSON string literal (or null); the tests send only printable text. */
    private static String quote(String s) {
        return s == null ? "null" : "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
    }
}
