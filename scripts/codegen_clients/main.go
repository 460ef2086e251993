// A Go caller written from proto/ alone, run by scripts/check_codegen.py against a live daemon:
// one StreamComplete (each event printed as it arrives), then one grpc.health.v1 Check.
//
//	client HOST:PORT
//
// Exits 1 on any failed call, printing its gRPC status.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	mb "github.com/model-broker/model-broker/gen/go/modelbroker/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
)

func fail(what string, err error) {
	fmt.Printf("%s failed: %v\n", what, err)
	os.Exit(1)
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()

	stream, err := mb.NewModelBrokerClient(conn).StreamComplete(ctx, &mb.StreamCompleteRequest{
		Model: "openai/gpt-4o-mini",
		Messages: []*mb.Message{{
			Role:    mb.Role_ROLE_USER,
			Content: []*mb.ContentPart{{Part: &mb.ContentPart_Text{Text: "Say hello"}}},
		}},
	})
	if err != nil {
		fail("StreamComplete", err)
	}
	var text strings.Builder
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("StreamComplete", err)
		}
		switch ev := msg.Event.(type) {
		case *mb.StreamCompleteResponse_Start:
			fmt.Printf("start: provider=%s model=%s\n", ev.Start.Provider, ev.Start.Model)
		case *mb.StreamCompleteResponse_TextDelta:
			text.WriteString(ev.TextDelta.Text)
			fmt.Printf("text_delta: %q\n", ev.TextDelta.Text)
		case *mb.StreamCompleteResponse_End:
			fmt.Printf("end: finish_reason=%s input_tokens=%d output_tokens=%d\n",
				ev.End.FinishReason, ev.End.GetUsage().GetInputTokens(), ev.End.GetUsage().GetOutputTokens())
		default:
			fmt.Printf("event: %T\n", ev)
		}
	}
	fmt.Printf("text: %q\n", text.String())

	service := "modelbroker.v1.ModelBroker"
	resp, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{Service: service})
	if err != nil {
		fail("health Check", err)
	}
	fmt.Printf("health %s: %s\n", service, resp.Status)
}
