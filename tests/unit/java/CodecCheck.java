import java.io.EOFException;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CopyOnWriteArrayList;

/**
 * Test driver for PoolRuntime (used by tests/unit/test_java_sdk.py).
 *
 *   echo        read frames from stdin, write each decoded value back re-encoded to stdout;
 *               a decode error goes to stderr with exit status 2
 *   checkpoint  call PoolRuntime.checkpoint() and print what this copy sees, one key=value a line;
 *               with CODEC_CHECK_SERVE set it then runs on (the SDK serving its control channel)
 *               until stdin closes, and prints every hook that ran as events=...
 */
public class CodecCheck {

    public static void main(String[] args) throws Exception {
        if (args.length > 0 && args[0].equals("echo")) {
            echo();
        } else if (args.length > 0 && args[0].equals("checkpoint")) {
            checkpoint();
        } else {
            System.err.println("usage: CodecCheck echo|checkpoint [args...]");
            System.exit(64);
        }
    }

    private static void echo() throws Exception {
        // The codec is private to PoolRuntime; reach it reflectively (same unnamed module).
        Method readFrame = PoolRuntime.class.getDeclaredMethod("readFrame", InputStream.class);
        Method writeFrame = PoolRuntime.class.getDeclaredMethod("writeFrame", OutputStream.class, Object.class);
        readFrame.setAccessible(true);
        writeFrame.setAccessible(true);
        OutputStream out = new FileOutputStream(FileDescriptor.out);
        while (true) {
            Object value;
            try {
                value = readFrame.invoke(null, System.in);
            } catch (InvocationTargetException e) {
                if (e.getCause() instanceof EOFException) {
                    return;
                }
                System.err.println("error: " + e.getCause().getMessage());
                System.exit(2);
                return;
            }
            writeFrame.invoke(null, out, value);
        }
    }

    private static void checkpoint() throws IOException {
        List<String> events = new CopyOnWriteArrayList<>(); // checkpoint hooks run on the SDK's thread
        Random first = PoolRuntime.registerRandom(new Random(1));
        Random second = PoolRuntime.registerRandom(new Random(1));
        first.nextLong(); // used before the checkpoint, like a warmed-up app would
        PoolRuntime.beforeCheckpoint(() -> events.add("before:A"));
        PoolRuntime.beforeCheckpoint(() -> events.add("before:B"));
        PoolRuntime.afterRestore(() -> events.add("after:A"));
        PoolRuntime.afterRestore(() -> {
            if (PoolRuntime.getenv("FAIL_HOOK") != null) {
                throw new IllegalStateException("hook asked to fail: " + PoolRuntime.getenv("FAIL_HOOK"));
            }
            events.add("after:B");
        });
        PoolRuntime.afterCheckpoint(() -> events.add("checkpoint:A"));
        PoolRuntime.afterCheckpoint(() -> {
            if (PoolRuntime.getenv("FAIL_CHECKPOINT_HOOK") != null) {
                throw new IllegalStateException("checkpoint hook asked to fail");
            }
            events.add("checkpoint:B");
        });

        PoolRuntime.Identity id = PoolRuntime.checkpoint();

        System.out.println("instance=" + id.instanceId());
        System.out.println("greeting=" + PoolRuntime.getenv("GREETING"));
        System.out.println("fallback=" + PoolRuntime.getenv("CODEC_CHECK_FALLBACK"));
        System.out.println("hostname=" + id.hostname());
        System.out.println("seed=" + id.seed());
        System.out.println("deadline=" + id.deadline());
        System.out.println("random1=" + first.nextLong());
        System.out.println("random2=" + second.nextLong());
        System.out.println("hooks=" + String.join(",", events));
        System.out.println("same=" + (PoolRuntime.checkpoint() == id));
        for (String arg : id.args()) {
            System.out.println("arg=" + arg);
        }
        System.out.println("done");
        if (System.getenv("CODEC_CHECK_SERVE") != null) {
            while (System.in.read() >= 0) {
                // the pool's side drives the control channel meanwhile
            }
            System.out.println("events=" + String.join(",", events));
        }
    }
}
