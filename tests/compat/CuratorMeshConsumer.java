import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryOneTime;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;

/**
 * Curator ServiceDiscovery consumers, one per connect string, each asking once for the
 * instances of one service, as an application resolves its providers.
 *
 * <p>Usage: {@code CuratorMeshConsumer BASE_PATH SERVICE CONNECT...}. Prints one line per
 * consumer, in argument order: {@code <index> <address>:<port>[ sidecar],...} sorted, or
 * {@code <index> none}; a sidecar is an instance whose payload carries
 * {@code zkgate.sidecar=true}.
 */
public class CuratorMeshConsumer {
    public static void main(String[] args) throws Exception {
        String base = args[0];
        String service = args[1];
        for (int i = 2; i < args.length; i++) {
            CuratorFramework client =
                CuratorFrameworkFactory.newClient(args[i], 10000, 10000, new RetryOneTime(100));
            client.start();
            client.blockUntilConnected();
            ServiceDiscovery<Map> discovery = ServiceDiscoveryBuilder.builder(Map.class)
                .client(client).basePath(base)
                .serializer(new JsonInstanceSerializer<>(Map.class)).build();
            discovery.start();
            Collection<ServiceInstance<Map>> instances = discovery.queryForInstances(service);
            List<String> seen = new ArrayList<>();
            for (ServiceInstance<Map> instance : instances) {
                Map payload = instance.getPayload();
                boolean sidecar = payload != null && "true".equals(payload.get("zkgate.sidecar"));
                seen.add(instance.getAddress() + ":" + instance.getPort() + (sidecar ? " sidecar" : ""));
            }
            seen.sort(null);
            System.out.println((i - 2) + " " + (seen.isEmpty() ? "none" : String.join(",", seen)));
            discovery.close();
            client.close();
        }
    }
}
