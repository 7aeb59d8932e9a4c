import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

/** Example prewarm-pool template: boot, warm up, listen, then checkpoint. */
public class App {

    private static final Random RANDOM = PoolRuntime.registerRandom(new Random());
    private static volatile PoolRuntime.Identity identity;

    public static void main(String[] args) throws Exception {
        String portEnv = System.getenv("PORT");
        int port = portEnv == null || portEnv.isBlank() ? 8080 : Integer.parseInt(portEnv.trim());

        // A little real work for the checkpoint to save.
        Map<Integer, String> table = new HashMap<>();
        for (int i = 0; i < 200_000; i++) {
            table.put(i, Integer.toHexString(i * 31));
        }

        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 0);
        server.createContext("/", App::handle);
        server.start();
        System.out.println("ready: listening on 127.0.0.1:" + server.getAddress().getPort()
                + " (" + table.size() + " entries warmed)");

        // Returns in every restored copy; the listening socket comes along.
        identity = PoolRuntime.checkpoint(args);
        System.out.println("ready: instance " + identity.instanceId());
    }

    private static void handle(HttpExchange ex) throws IOException {
        try (ex) {
            if (!"GET".equals(ex.getRequestMethod()) || !"/".equals(ex.getRequestURI().getPath())) {
                ex.sendResponseHeaders(404, -1);
                return;
            }
            PoolRuntime.Identity id = identity;
            List<String> args = new ArrayList<>();
            for (String a : id == null ? List.<String>of() : id.args()) {
                args.add(quote(a));
            }
            String body = "{\"instance\": " + quote(id == null ? null : id.instanceId())
                    + ", \"random\": " + RANDOM.nextDouble()
                    + ", \"args\": [" + String.join(", ", args) + "]"
                    + ", \"greeting\": " + quote(PoolRuntime.getenv("GREETING")) + "}\n";
            byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
            ex.getResponseHeaders().set("Content-Type", "application/json");
            ex.sendResponseHeaders(200, bytes.length);
            try (OutputStream out = ex.getResponseBody()) {
                out.write(bytes);
            }
        }
    }

    /** JSON string literal (or null). */
    private static String quote(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                case '\n' -> b.append("\\n");
                case '\r' -> b.append("\\r");
                case '\t' -> b.append("\\t");
                default -> {
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
                }
            }
        }
        return b.append('"').toString();
    }
}
