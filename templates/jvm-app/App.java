import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonToken;
import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.ObjectReader;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.File;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Executors;

/**
 * jvm-app: a catalogue lookup service, the heavy Java template.
 *
 * Start-up is real work, no sleep: Jackson (Debian's jars) parses data/items.json (~42 MB) into
 * objects, an index is built (by key; per category, sorted by score, for ranks), and a warm-up loop
 * runs the request path until the JIT has compiled it. Then the HTTP port opens and the app hands
 * itself to the pool (PoolRuntime.checkpoint); outside the pool checkpoint() returns at once.
 *
 *   GET /lookup?key=k0000042 -> {"key":..., "name":..., "score":..., "category":...,
 *                                "rank": position by score in its category, "categorySize": ...}
 */
public class App {

    /** One catalogue item, bound by Jackson databind. */
    public static final class Item {
        public String key;
        public String name;
        public String category;
        public long score;
        public String[] tags;
        public Attrs attrs;
        public int[] history;
        public int rank;          // filled in by the index, not in the file
    }

    /** Typed, not a Map: a Map per item would double the index's memory (and every copy's). */
    public static final class Attrs {
        public String color;
        public int size;
        public double weight;
    }

    private static final ObjectMapper MAPPER = new ObjectMapper()
            .configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);
    private static final Map<String, Item> BY_KEY = new HashMap<>();
    private static final Map<String, Integer> CATEGORY_SIZE = new HashMap<>();

    public static void main(String[] args) throws Exception {
        long t0 = System.nanoTime();
        int port = Integer.parseInt(System.getenv().getOrDefault("PORT", "8080"));
        File data = new File(System.getenv().getOrDefault("JVM_APP_DATA", "data/items.json"));

        load(data);
        long t1 = System.nanoTime();
        int warm = Integer.parseInt(System.getenv().getOrDefault("JVM_APP_WARMUP", "60000"));
        long checksum = warmUp(warm);
        long t2 = System.nanoTime();

        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 64);
        server.createContext("/lookup", App::lookup);
        server.createContext("/health", ex -> reply(ex, 200, "{\"ok\":true}"));
        server.setExecutor(Executors.newFixedThreadPool(4));
        server.start();
        System.out.printf("jvm-app: %d items indexed in %d ms, warm-up %d ms (checksum %d), "
                + "listening on %d%n", BY_KEY.size(), (t1 - t0) / 1_000_000,
                (t2 - t1) / 1_000_000, checksum, port);

        if (System.getenv("POOL_CONTROL_FDS") != null) {
            // Only before a real checkpoint (a cold start does not need it, and its GC pause would
            // land on the first request): drop the parse's garbage from the image.
            PoolRuntime.beforeCheckpoint(App::compactHeap);
        }
        PoolRuntime.Identity id = PoolRuntime.checkpoint(args);
        System.out.println("jvm-app: serving as instance " + id.instanceId());
    }

    /**
     * Collect the start-up garbage and wait until G1 has handed the freed heap back to the OS: it
     * uncommits in a background thread shortly after the GC, and CRIU saves every resident page, so
     * dumping at once would put a few hundred MB of garbage into the image and into every copy.
     */
    private static void compactHeap() {
        System.gc();
        long last = rssAnonKb();
        long stableSince = System.nanoTime();
        long deadline = stableSince + 3_000_000_000L;
        while (System.nanoTime() < deadline && System.nanoTime() - stableSince < 300_000_000L) {
            try {
                Thread.sleep(20);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return;
            }
            long now = rssAnonKb();
            if (now != last) {
                last = now;
                stableSince = System.nanoTime();
            }
        }
    }

    private static long rssAnonKb() {
        try {
            for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
                if (line.startsWith("RssAnon:")) {
                    return Long.parseLong(line.replaceAll("[^0-9]", ""));
                }
            }
        } catch (IOException | NumberFormatException e) {
            // not Linux: nothing to wait for
        }
        return -1;
    }

    /** Stream-parse the array item by item (Jackson databind), then index it. */
    private static void load(File data) throws IOException {
        ObjectReader reader = MAPPER.readerFor(Item.class);
        Map<String, List<Item>> byCategory = new HashMap<>();
        try (JsonParser p = MAPPER.getFactory().createParser(data)) {
            if (p.nextToken() != JsonToken.START_ARRAY) {
                throw new IOException(data + ": expected a JSON array");
            }
            while (p.nextToken() == JsonToken.START_OBJECT) {
                Item it = reader.readValue(p);
                // few distinct values, repeated 220k times: share one String each
                it.category = it.category.intern();
                it.attrs.color = it.attrs.color.intern();
                for (int t = 0; t < it.tags.length; t++) {
                    it.tags[t] = it.tags[t].intern();
                }
                BY_KEY.put(it.key, it);
                byCategory.computeIfAbsent(it.category, c -> new ArrayList<>()).add(it);
            }
        }
        Comparator<Item> byScore = Comparator.comparingLong((Item i) -> -i.score).thenComparing(i -> i.key);
        for (Map.Entry<String, List<Item>> e : byCategory.entrySet()) {
            List<Item> items = e.getValue();
            items.sort(byScore);
            for (int r = 0; r < items.size(); r++) {
                items.get(r).rank = r + 1;
            }
            CATEGORY_SIZE.put(e.getKey(), items.size());
        }
    }

    /** Run the request path (lookup + JSON encoding) until the JIT has compiled it. */
    private static long warmUp(int rounds) throws IOException {
        long sum = 0;
        int n = BY_KEY.size();
        for (int i = 0; i < rounds; i++) {
            byte[] body = answer(key((i * 7919L) % n));
            sum += body.length;
        }
        return sum;
    }

    private static String key(long i) {
        String digits = Long.toString(i);
        return "k" + "0000000".substring(digits.length()) + digits;
    }

    private static byte[] answer(String key) throws IOException {
        Item it = BY_KEY.get(key);
        if (it == null) {
            return null;
        }
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("key", it.key);
        out.put("name", it.name);
        out.put("score", it.score);
        out.put("category", it.category);
        out.put("rank", it.rank);
        out.put("categorySize", CATEGORY_SIZE.get(it.category));
        out.put("tags", it.tags);
        out.put("color", it.attrs.color);
        return MAPPER.writeValueAsBytes(out);
    }

    private static void lookup(HttpExchange ex) throws IOException {
        try (ex) {
            String query = ex.getRequestURI().getRawQuery();
            String key = null;
            for (String kv : query == null ? new String[0] : query.split("&")) {
                if (kv.startsWith("key=")) {
                    key = URLDecoder.decode(kv.substring(4), StandardCharsets.UTF_8);
                }
            }
            byte[] body = key == null ? null : answer(key);
            if (body == null) {
                reply(ex, 404, "{\"error\":\"no such key\"}");
                return;
            }
            send(ex, 200, body);
        }
    }

    private static void reply(HttpExchange ex, int status, String json) throws IOException {
        send(ex, status, json.getBytes(StandardCharsets.UTF_8));
    }

    private static void send(HttpExchange ex, int status, byte[] body) throws IOException {
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(status, body.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(body);
        }
    }
}
