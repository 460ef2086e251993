// A Java caller written from proto/ alone, run by scripts/check_codegen.py against a live
// daemon: one StreamComplete (each event printed as it arrives), then one grpc.health.v1 Check.
//
//     java -cp ... mbcheck.Main HOST:PORT
//
// Exits 1 on any failed call, printing its gRPC status.
package mbcheck;

import dev.modelbroker.v1.ContentPart;
import dev.modelbroker.v1.Message;
import dev.modelbroker.v1.ModelBrokerGrpc;
import dev.modelbroker.v1.Role;
import dev.modelbroker.v1.StreamCompleteRequest;
import dev.modelbroker.v1.StreamCompleteResponse;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

public final class Main {
  public static void main(String[] args) throws InterruptedException {
    ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0]).usePlaintext().build();
    String step = "StreamComplete";
    try {
      StreamCompleteRequest request =
          StreamCompleteRequest.newBuilder()
              .setModel("openai/gpt-4o-mini")
              .addMessages(
                  Message.newBuilder()
                      .setRole(Role.ROLE_USER)
                      .addContent(ContentPart.newBuilder().setText("Say hello")))
              .build();
      Iterator<StreamCompleteResponse> events =
          ModelBrokerGrpc.newBlockingStub(channel)
              .withDeadlineAfter(20, TimeUnit.SECONDS)
              .streamComplete(request);
      StringBuilder text = new StringBuilder();
      while (events.hasNext()) {
        StreamCompleteResponse msg = events.next();
        switch (msg.getEventCase()) {
          case START:
            System.out.printf(
                "start: provider=%s model=%s%n", msg.getStart().getProvider(), msg.getStart().getModel());
            break;
          case TEXT_DELTA:
            text.append(msg.getTextDelta().getText());
            System.out.printf("text_delta: \"%s\"%n", msg.getTextDelta().getText());
            break;
          case END:
            System.out.printf(
                "end: finish_reason=%s input_tokens=%d output_tokens=%d%n",
                msg.getEnd().getFinishReason(),
                msg.getEnd().getUsage().getInputTokens(),
                msg.getEnd().getUsage().getOutputTokens());
            break;
          default:
            System.out.printf("event: %s%n", msg.getEventCase());
        }
      }
      System.out.printf("text: \"%s\"%n", text);

      step = "health Check";
      String service = "modelbroker.v1.ModelBroker";
      HealthCheckResponse health =
          HealthGrpc.newBlockingStub(channel)
              .withDeadlineAfter(10, TimeUnit.SECONDS)
              .check(HealthCheckRequest.newBuilder().setService(service).build());
      System.out.printf("health %s: %s%n", service, health.getStatus());
    } catch (StatusRuntimeException e) {
      System.out.printf("%s failed: %s%n", step, e.getStatus());
      System.exit(1);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
